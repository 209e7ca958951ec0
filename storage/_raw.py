"""SQLite: statements run straight on the driver's cursor, inside the caller's transaction.

For the hottest batch writers (the request log's begins and completions, the commit
protocol's prepares, commits and decisions), SQLAlchemy's per-statement work (cache
key, compiled-statement lookup, execution context, parameter processing) costs more
CPU than SQLite executing the statement. Prebuilt SQL run with ``executemany`` on the
connection's own cursor skips it and stays in the batch's transaction (the appender's
``BEGIN IMMEDIATE``, issued on the driver: no other writer changes the rows meanwhile).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection


def raw_cursor(conn: Connection) -> Any:
    """The SQLite driver's cursor on ``conn``'s connection (close it after use)."""
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]


def raw_executemany(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """SQLite: ``sql`` once per row of ``rows`` on the driver's cursor."""
    cursor = raw_cursor(conn)
    try:
        raw_run(cursor, sql, rows)
    finally:
        cursor.close()


def raw_run(cursor: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``cursor.executemany(sql, rows)``, a driver error raised as SQLAlchemy's wrapper
    of it (``sa.exc.IntegrityError``, ...), exactly as a statement run through
    SQLAlchemy would raise it."""
    try:
        cursor.executemany(sql, rows)
    except sqlite3.Error as exc:
        raise sa.exc.DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc
