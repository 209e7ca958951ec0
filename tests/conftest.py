"""Shared fixtures: real databases, one fresh database per test.

``db_url`` is parametrized over ``sqlite`` (a file in the test's ``tmp_path``) and
``postgres`` (a fresh schema in the database named by ``TXRPC_TEST_POSTGRES_URL``,
selected through the connection's ``search_path`` and dropped afterwards; skipped
with a reason when the variable is unset).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_URL_ENV = "TXRPC_TEST_POSTGRES_URL"


def postgres_base_url() -> str | None:
    """The PostgreSQL URL tests may use, or None when PostgreSQL tests are off."""
    return os.environ.get(POSTGRES_URL_ENV) or None


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A ``sqlite:///`` URL of a not-yet-existing file in ``tmp_path``."""
    return f"sqlite:///{tmp_path / 'txrpc.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose ``search_path`` is a fresh, empty schema (dropped afterwards)."""
    base = postgres_base_url()
    if base is None:
        pytest.skip(
            f"PostgreSQL tests need {POSTGRES_URL_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)"
        )
    schema = f"txrpc_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(base, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql("SET lock_timeout = '10s'")
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """A URL of an empty database: SQLite file or PostgreSQL schema (see module doc)."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(name)
    return url
