"""Tables and the ordered list of forward migrations.

The ``Table`` objects here describe the schema at :data:`SCHEMA_VERSION` and are what
queries are built from. They are *not* used to create tables: every database, fresh
or old, reaches the current schema by running :data:`MIGRATIONS` in order, so a fresh
database and a migrated one cannot drift apart (a test compares them).

Version bookkeeping lives in ``txrpc_schema``: one row per applied migration; the
database's version is the highest ``version`` in it (0 when the table is absent).
Migrations only go forward; a database whose version is above :data:`SCHEMA_VERSION`
was written by newer code and is refused (see ``open_engine``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

schema_versions = sa.Table(
    "txrpc_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String, nullable=False),
    # Wall-clock seconds, for display only.
    sa.Column("applied_at", sa.Double, nullable=False),
)

request_log = sa.Table(
    "txrpc_request_log",
    metadata,
    sa.Column("identity", sa.String, primary_key=True),
    sa.Column("idempotency_key", sa.String, primary_key=True),
    sa.Column("method", sa.String, nullable=False),
    sa.Column("fingerprint", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=True),
    sa.Column("error_code", sa.Integer, nullable=True),
    sa.Column("error_message", sa.String, nullable=True),
    sa.Column("error_details", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("completed_at", sa.Double, nullable=True),
    sa.Column("lease_expires_at", sa.Double, nullable=False),
    sa.Column("replay_count", sa.Integer, nullable=False),
    sa.Column("last_replayed_at", sa.Double, nullable=True),
    # Canonical CBOR of [args, kwargs] (migration 4): what `txrpc replay` re-sends.
    # NULL for rows written before migration 4.
    sa.Column("request", sa.LargeBinary, nullable=True),
)

kv = sa.Table(
    "txrpc_kv",
    metadata,
    sa.Column("namespace", sa.String, primary_key=True),
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One forward step: ``apply(conn)`` runs inside the caller's transaction."""

    version: int
    description: str
    apply: Callable[[Connection], None]


# --- migration 1: the request log -------------------------------------------------


def _migration_1(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "txrpc_schema",
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.String, nullable=False),
        sa.Column("applied_at", sa.Double, nullable=False),
    )
    log = sa.Table(
        "txrpc_request_log",
        md,
        sa.Column("identity", sa.String, primary_key=True),
        sa.Column("idempotency_key", sa.String, primary_key=True),
        sa.Column("method", sa.String, nullable=False),
        sa.Column("fingerprint", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=True),
        sa.Column("error_code", sa.Integer, nullable=True),
        sa.Column("error_message", sa.String, nullable=True),
        sa.Column("error_details", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("completed_at", sa.Double, nullable=True),
        sa.Column("lease_expires_at", sa.Double, nullable=False),
        sa.CheckConstraint("state IN ('in_progress', 'completed')", name="ck_request_log_state"),
        sa.CheckConstraint("attempt >= 1", name="ck_request_log_attempt"),
        # An in-progress row has no outcome; a completed one has exactly one of
        # response / error.
        sa.CheckConstraint(
            "(state = 'in_progress' AND response IS NULL AND error_code IS NULL"
            " AND completed_at IS NULL)"
            " OR (state = 'completed' AND completed_at IS NOT NULL"
            " AND ((response IS NULL AND error_code IS NOT NULL)"
            " OR (response IS NOT NULL AND error_code IS NULL)))",
            name="ck_request_log_outcome",
        ),
    )
    sa.Index("ix_request_log_state_created", log.c.state, log.c.created_at)
    sa.Index("ix_request_log_completed", log.c.completed_at)
    md.create_all(conn)


# --- migration 2: replay accounting and the key-value table ----------------------


def _add_column(conn: Connection, table: str, column: sa.Column[object], default_sql: str | None) -> None:
    """``ALTER TABLE ... ADD COLUMN`` with the column type rendered for this dialect."""
    preparer = conn.dialect.identifier_preparer
    type_sql = column.type.compile(dialect=conn.dialect)
    null_sql = "" if column.nullable else " NOT NULL"
    default = f" DEFAULT {default_sql}" if default_sql is not None else ""
    conn.execute(
        sa.text(
            f"ALTER TABLE {preparer.quote(table)} ADD COLUMN "
            f"{preparer.quote(column.name)} {type_sql}{default}{null_sql}"
        )
    )


def _migration_2(conn: Connection) -> None:
    _add_column(conn, "txrpc_request_log", sa.Column("replay_count", sa.Integer, nullable=False), "0")
    _add_column(conn, "txrpc_request_log", sa.Column("last_replayed_at", sa.Double, nullable=True), None)
    md = sa.MetaData()
    table = sa.Table(
        "txrpc_kv",
        md,
        sa.Column("namespace", sa.String, primary_key=True),
        sa.Column("key", sa.String, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.CheckConstraint("version >= 1", name="ck_kv_version"),
    )
    table.create(conn)


# --- migration 3: the commit protocol's tables (defined in _txn_schema.py) ----------


def _migration_3(conn: Connection) -> None:
    from ._txn_schema import migration_3  # imports this module: resolve at call time

    migration_3(conn)


# --- migration 4: the request's arguments, for `txrpc replay` -------------------------


def _migration_4(conn: Connection) -> None:
    _add_column(conn, "txrpc_request_log", sa.Column("request", sa.LargeBinary, nullable=True), None)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "request log", _migration_1),
    Migration(2, "request-log replay accounting; key-value table", _migration_2),
    Migration(
        3, "commit protocol: shard data, commit log, prepare records, decisions, txid blocks", _migration_3
    ),
    Migration(4, "request log: the request's arguments (for replay)", _migration_4),
)
SCHEMA_VERSION: int = MIGRATIONS[-1].version

assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1)), "migrations must be 1..N"


def current_version(conn: Connection) -> int:
    """The database's schema version: 0 for a database without txrpc's tables."""
    if not sa.inspect(conn).has_table(schema_versions.name):
        return 0
    version = conn.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar()
    return int(version) if version is not None else 0


def migrate(conn: Connection, *, applied_at: float, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply the migrations after the current version up to ``target``, in order.

    Runs inside the caller's transaction (so a failing migration leaves nothing
    behind) and returns the versions applied. Raises ``ValueError`` if ``target`` is
    unknown or below the current version: migrations only go forward.
    """
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"unknown schema version {target}; this code knows 1..{SCHEMA_VERSION}")
    found = current_version(conn)
    if found > target:
        raise ValueError(f"schema is at version {found}; migrations only go forward (asked for {target})")
    applied: list[int] = []
    for migration in MIGRATIONS[found:target]:
        migration.apply(conn)
        conn.execute(
            sa.insert(schema_versions).values(
                version=migration.version, description=migration.description, applied_at=applied_at
            )
        )
        applied.append(migration.version)
    return applied
