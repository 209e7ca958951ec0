"""Opening a database: URL resolution, durability settings, schema checks, clear errors.

``open_engine`` is the only way storage opens a database. It returns a SQLAlchemy
``Engine`` whose connections are already configured (SQLite: WAL, ``synchronous=FULL``,
busy timeout, foreign keys; PostgreSQL via psycopg 3) and whose schema is at
:data:`~storage._schema.SCHEMA_VERSION`. Every way opening can fail becomes a
:class:`~storage.StorageError` subclass whose message says what to do.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ._errors import (
    NoSuchDatabase,
    SchemaTooNew,
    SchemaTooOld,
    StorageCorrupt,
    StorageError,
    StorageReadOnly,
    StorageUnavailable,
)
from ._schema import SCHEMA_VERSION, current_version, migrate, schema_versions

SQLITE_FILE_NAME = "txrpc.db"
BUSY_TIMEOUT_S_DEFAULT = 5.0
CONNECT_TIMEOUT_S_DEFAULT = 10.0
POOL_SIZE_DEFAULT = 6

# Execution option: the transaction about to begin will write (SQLite: BEGIN IMMEDIATE,
# so it queues on the busy timeout for the write lock instead of failing half-way).
WRITE_OPTION = "txrpc_write"
APPENDER_TRANSACTION = "txrpc_appender_transaction"
"""Key in a SQLite connection's ``info`` while the group-commit appender holds a
transaction it began on the driver (``storage._appender._write_in_sqlite_transaction``):
SQLAlchemy's begin then joins it, and nothing else may commit or roll it back."""

# Any constant: PostgreSQL advisory lock id serialising concurrent migrations.
_PG_MIGRATION_LOCK = 0x7478_7270_6300  # "txrpc"


def resolve_url(url_or_path: str | os.PathLike[str]) -> sa.URL:
    """Turn a path, a directory or a URL into the SQLAlchemy URL storage will use.

    - an existing directory ``D`` → ``sqlite:///D/txrpc.db``;
    - any other path → that SQLite file;
    - ``sqlite:///...`` → as given (``sqlite://`` / ``:memory:`` is refused: the
      storage threads would each see a different empty database);
    - ``postgresql://`` / ``postgres://`` → ``postgresql+psycopg://`` (psycopg 3);
      ``postgresql+psycopg://`` as given.

    Raises :class:`StorageError` for a URL it cannot use.
    """
    text = os.fspath(url_or_path)
    if "://" not in text:
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / SQLITE_FILE_NAME
        return sa.URL.create("sqlite", database=str(path.absolute()))
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError as exc:
        raise StorageError(f"cannot parse database URL {text!r}: {exc}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            raise StorageError(
                "in-memory SQLite is not supported (each storage thread would see its own "
                "empty database); use a file path, e.g. a temporary directory"
            )
        path = Path(database).expanduser()
        if path.is_dir():
            path = path / SQLITE_FILE_NAME
        return url.set(drivername="sqlite", database=str(path.absolute()))
    if backend in ("postgresql", "postgres"):
        driver = url.drivername.partition("+")[2]
        if driver in ("", "psycopg"):
            return url.set(drivername="postgresql+psycopg")
        raise StorageError(f"unsupported PostgreSQL driver {driver!r}: use postgresql+psycopg:// (psycopg 3)")
    raise StorageError(
        f"unsupported database {backend!r} in {url.render_as_string(hide_password=True)}: "
        "use a SQLite path or sqlite:/// URL, or postgresql+psycopg://"
    )


def display_url(url: sa.URL) -> str:
    """The URL with any password hidden, for messages."""
    return url.render_as_string(hide_password=True)


def open_engine(
    url_or_path: str | os.PathLike[str],
    *,
    create: bool = True,
    read_only: bool = False,
    busy_timeout_s: float = BUSY_TIMEOUT_S_DEFAULT,
    connect_timeout_s: float = CONNECT_TIMEOUT_S_DEFAULT,
    pool_size: int = POOL_SIZE_DEFAULT,
) -> Engine:
    """Open (and by default create and migrate) a txrpc database; blocking.

    ``url_or_path`` is resolved by :func:`resolve_url`. With ``create`` false a
    SQLite file must already exist. With ``read_only`` true nothing is created,
    migrated or written (SQLite connections run ``PRAGMA query_only``, PostgreSQL
    sessions are read-only) and the schema must already be current.

    Promises: the returned engine's schema is at ``SCHEMA_VERSION``; on SQLite every
    connection has ``journal_mode=WAL``, ``synchronous=FULL``, ``foreign_keys=ON`` and
    ``busy_timeout``; a read-write open has proved it can write (a probe write,
    rolled back). A database newer than this code is never modified.

    Raises (all :class:`StorageError`): :class:`SchemaTooNew`, :class:`SchemaTooOld`
    (read-only open of an older schema), :class:`NoSuchDatabase`,
    :class:`StorageCorrupt`, :class:`StorageReadOnly`, :class:`StorageUnavailable`.
    Call it from a worker thread when inside trio (``open_storage`` does).
    """
    if busy_timeout_s < 0 or connect_timeout_s <= 0 or pool_size < 1:
        raise ValueError("busy_timeout_s >= 0, connect_timeout_s > 0 and pool_size >= 1 are required")
    url = resolve_url(url_or_path)
    shown = display_url(url)
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(
            url, create=create, read_only=read_only, busy_timeout_s=busy_timeout_s, pool_size=pool_size
        )
    else:
        engine = _postgres_engine(
            url, read_only=read_only, connect_timeout_s=connect_timeout_s, pool_size=pool_size
        )
    try:
        _check_schema(engine, shown, read_only=read_only)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _sqlite_engine(
    url: sa.URL, *, create: bool, read_only: bool, busy_timeout_s: float, pool_size: int
) -> Engine:
    path = Path(url.database or "")
    shown = str(path)
    if not path.parent.is_dir():
        raise StorageUnavailable(
            f"cannot open SQLite database {shown}: directory {path.parent} does not exist "
            "(create it first, or pass an existing directory)"
        )
    if not path.exists() and (read_only or not create):
        raise NoSuchDatabase(f"no database at {shown} (nothing was created; check the path)")
    if path.exists() and not path.is_file():
        raise StorageUnavailable(f"cannot open SQLite database {shown}: not a regular file")

    engine = sa.create_engine(url, pool_size=pool_size, max_overflow=4)
    busy_ms = int(busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # BEGIN is issued explicitly (see _begin, and the appender's own); the driver must not.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            if read_only:
                cursor.execute("PRAGMA query_only = ON")
            else:
                mode = _switch_to_wal(cursor, busy_timeout_s)
                if str(mode).lower() != "wal":
                    raise StorageError(
                        f"SQLite database {shown} refused WAL mode (journal_mode is {mode}); "
                        "put it on a local filesystem"
                    )
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Straight on the driver: a statement run through SQLAlchemy (exec_driver_sql)
        # costs several times SQLite's BEGIN. A driver error is raised as SQLAlchemy's
        # wrapper of it, as exec_driver_sql did. The one transaction SQLAlchemy does not
        # begin is the group-commit appender's (begun on the driver, marked in ``info``):
        # SQLAlchemy joins it. Any other open transaction makes BEGIN fail, loudly.
        if conn.info.get(APPENDER_TRANSACTION):
            return
        sql = "BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN"
        try:
            conn.connection.driver_connection.execute(sql)  # type: ignore[union-attr]
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, sqlite3.Error) from exc

    @event.listens_for(engine, "commit")
    def _commit(conn: Connection) -> None:
        if conn.info.get(APPENDER_TRANSACTION):
            raise sa.exc.InvalidRequestError(
                "a group-commit record kind may not commit the batch's transaction (RecordKind.write_batch)"
            )

    @event.listens_for(engine, "rollback")
    def _rollback(conn: Connection) -> None:
        if conn.info.get(APPENDER_TRANSACTION):
            raise sa.exc.InvalidRequestError(
                "a group-commit record kind may not roll back the batch's transaction (RecordKind.write_batch)"
            )

    return engine


def _switch_to_wal(cursor: Any, busy_timeout_s: float) -> Any:
    """``PRAGMA journal_mode = WAL``, retried while the database is locked: switching a
    fresh database to WAL needs an exclusive lock, and SQLite answers "database is
    locked" at once there instead of waiting out the busy timeout (seen when several
    processes open a new database together). Bounded by ``busy_timeout_s``."""
    give_up_at = time.monotonic() + busy_timeout_s
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= give_up_at:
                raise
            time.sleep(0.005)


def _postgres_engine(url: sa.URL, *, read_only: bool, connect_timeout_s: float, pool_size: int) -> Engine:
    connect_args: dict[str, Any] = {"connect_timeout": max(1, round(connect_timeout_s))}
    try:
        engine = sa.create_engine(
            url,
            pool_size=pool_size,
            max_overflow=4,
            pool_pre_ping=True,
            connect_args=connect_args,
        )
    except ModuleNotFoundError as exc:  # psycopg is the optional `postgres` extra
        raise StorageError(
            f"PostgreSQL support needs psycopg 3: pip install 'txrpc[postgres]' ({exc})"
        ) from None
    if read_only:
        engine = engine.execution_options(postgresql_readonly=True)
    return engine


def _check_schema(engine: Engine, shown: str, *, read_only: bool) -> None:
    known = SCHEMA_VERSION
    try:
        with engine.connect() as conn:
            if not read_only:
                conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin() as transaction:
                if conn.dialect.name == "postgresql" and not read_only:
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                found = current_version(conn)
                if found > known:
                    raise SchemaTooNew(
                        f"database {shown} has schema version {found}, but this txrpc knows only "
                        f"up to version {known}: it was written by a newer txrpc. Upgrade txrpc "
                        "(or open another database); it was not modified.",
                        found=found,
                        known=known,
                    )
                if read_only:
                    if found == 0:
                        raise NoSuchDatabase(f"database {shown} has no txrpc schema (nothing to read)")
                    if found < known:
                        raise SchemaTooOld(
                            f"database {shown} has schema version {found}; this txrpc reads version "
                            f"{known}. Opening it read-write (a server, or a writing command such "
                            "as `txrpc log prune`) migrates it.",
                            found=found,
                            known=known,
                        )
                    transaction.rollback()
                    return
                if found < known:
                    migrate(conn, applied_at=time.time())
                    transaction.commit()
                    return
                # Already current: prove the database takes writes, then undo the probe.
                conn.execute(
                    sa.update(schema_versions)
                    .where(schema_versions.c.version == found)
                    .values(version=schema_versions.c.version)
                )
                transaction.rollback()
    except (sa.exc.DBAPIError, sqlite3.Error) as exc:
        raise translate_error(exc, shown) from exc


def translate_error(exc: BaseException, shown: str) -> StorageError:
    """Classify a driver error (SQLAlchemy-wrapped or raw) into the storage hierarchy.

    The message names the database and says what to do. Errors it cannot classify
    become a plain :class:`StorageError`.
    """
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    text = str(orig).strip()
    detail = text.splitlines()[0] if text else type(orig).__name__
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str):
        if name.startswith("SQLITE_READONLY"):
            return StorageReadOnly(
                f"SQLite database {shown} is read-only ({detail}): txrpc needs write access to the "
                "file and to its directory (for the -wal and -shm files). Fix the permissions or "
                "use another path."
            )
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return StorageCorrupt(
                f"{shown} is not a usable SQLite database ({detail}). Restore it from a backup or "
                "move it aside; txrpc will not write to it."
            )
        if name.startswith("SQLITE_CANTOPEN"):
            return StorageUnavailable(
                f"cannot open SQLite database {shown} ({detail}): check that the path exists and "
                "that its directory is writable"
            )
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return StorageUnavailable(
                f"SQLite database {shown} stayed locked by another connection beyond the busy "
                f"timeout ({detail}); is another process holding a long write transaction?"
            )
        if name.startswith("SQLITE_FULL"):
            return StorageUnavailable(f"disk full writing {shown} ({detail}); free some space")
        if name.startswith("SQLITE_IOERR"):
            return StorageUnavailable(f"I/O error on {shown} ({detail}); check the disk")
        if name.startswith("SQLITE_PERM") or name.startswith("SQLITE_AUTH"):
            return StorageReadOnly(f"SQLite database {shown}: permission denied ({detail})")
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate == "25006":
            return StorageReadOnly(
                f"PostgreSQL database {shown} is read-only for this session ({detail}): connect to "
                "the primary, or unset default_transaction_read_only"
            )
        if sqlstate == "42501":
            return StorageReadOnly(
                f"PostgreSQL database {shown}: permission denied ({detail}); grant the user "
                "CREATE/INSERT/UPDATE/DELETE on the schema"
            )
        if sqlstate == "3D000":
            return StorageUnavailable(
                f"PostgreSQL database in {shown} does not exist ({detail}); create it first"
            )
        if sqlstate == "3F000":
            return StorageUnavailable(
                f"PostgreSQL database {shown} has no usable schema in its search_path ({detail}); "
                "create the schema first"
            )
        if sqlstate.startswith("28"):
            return StorageUnavailable(f"PostgreSQL refused the credentials for {shown} ({detail})")
        if sqlstate.startswith(("08", "57P")):
            return StorageUnavailable(f"lost the connection to PostgreSQL at {shown} ({detail})")
        if sqlstate == "XX001" or sqlstate == "XX002":
            return StorageCorrupt(f"PostgreSQL reports corrupt data in {shown} ({detail})")
    invalidated = isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    if invalidated or isinstance(exc, sa.exc.OperationalError | sqlite3.OperationalError):
        return StorageUnavailable(
            f"cannot reach database {shown} ({detail}): check that it is running and reachable"
        )
    return StorageError(f"database error on {shown}: {detail}")
