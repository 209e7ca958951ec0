"""open_engine: URL forms, durability pragmas, schema versioning and every way opening fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import storage
from storage import _schema

# -- helpers ------------------------------------------------------------------------


def _raw_engine(url: str) -> sa.Engine:
    """A plain SQLAlchemy engine on the same database, bypassing storage's checks."""
    return sa.create_engine(url, poolclass=sa.NullPool)


def _versions(url: str) -> list[int]:
    engine = _raw_engine(url)
    try:
        with engine.connect() as conn:
            return [
                int(v)
                for v in conn.execute(sa.text("SELECT version FROM txrpc_schema ORDER BY version")).scalars()
            ]
    finally:
        engine.dispose()


def _sqlite_path(url: str) -> Path:
    return Path(sa.make_url(url).database or "")


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable for this process (chmod, or chattr +i when running as root)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root and `chattr +i` is unavailable: cannot make a file read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def _open_and_close(url: str | os.PathLike[str], **options: object) -> None:
    storage.open_engine(url, **options).dispose()  # type: ignore[arg-type]


# -- URL forms ----------------------------------------------------------------------


def test_directory_means_txrpc_db_inside(tmp_path: Path) -> None:
    engine = storage.open_engine(tmp_path)
    engine.dispose()
    assert (tmp_path / storage.SQLITE_FILE_NAME).is_file()
    assert sa.make_url(str(engine.url)).database == str(tmp_path / "txrpc.db")


def test_file_path_and_sqlite_url_open_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite3"
    _open_and_close(str(path))
    assert path.is_file()
    _open_and_close(f"sqlite:///{path}")  # already current: no error, same file
    assert _versions(f"sqlite:///{path}") == [m.version for m in storage.MIGRATIONS]
    assert not (tmp_path / storage.SQLITE_FILE_NAME).exists()


def test_sqlite_url_naming_a_directory(tmp_path: Path) -> None:
    _open_and_close(f"sqlite:///{tmp_path}")
    assert (tmp_path / storage.SQLITE_FILE_NAME).is_file()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_is_refused(url: str) -> None:
    with pytest.raises(storage.StorageError, match="in-memory SQLite is not supported"):
        storage.open_engine(url)


def test_unsupported_backend_is_refused() -> None:
    with pytest.raises(storage.StorageError, match="unsupported database 'mysql'"):
        storage.open_engine("mysql://user@localhost/db")


def test_plain_postgresql_scheme_selects_psycopg() -> None:
    assert storage.resolve_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert storage.resolve_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    with pytest.raises(storage.StorageError, match="psycopg 3"):
        storage.resolve_url("postgresql+asyncpg://u@h/db")


# -- durability settings -----------------------------------------------------------


def test_sqlite_connections_are_wal_full_sync(sqlite_url: str) -> None:
    engine = storage.open_engine(sqlite_url, busy_timeout_s=2.5)
    try:
        # Two connections checked out at once: the settings are per connection.
        with engine.connect() as first, engine.connect() as second:
            for conn in (first, second):
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
                assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 2500
    finally:
        engine.dispose()
    # WAL mode is persistent in the file itself.
    raw = _raw_engine(sqlite_url)
    with raw.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    raw.dispose()


def test_sqlite_write_transactions_begin_immediate(sqlite_url: str) -> None:
    """A write transaction takes the write lock at BEGIN, so a second writer waits or fails
    at its own BEGIN (never half-way through with a stale snapshot)."""
    engine = storage.open_engine(sqlite_url, busy_timeout_s=0.05)
    database = storage.Database(engine)
    try:
        with engine.connect() as holder:
            holder.execution_options(txrpc_write=True)
            with holder.begin():
                with pytest.raises(storage.StorageUnavailable, match="locked"):
                    database.write_sync(lambda conn: None)
                # Readers are not blocked by the writer (WAL).
                assert database.read_sync(lambda conn: conn.exec_driver_sql("SELECT 1").scalar()) == 1
    finally:
        engine.dispose()


# -- schema versioning ---------------------------------------------------------------


def _column_names(engine: sa.Engine) -> dict[str, set[str]]:
    inspector = sa.inspect(engine)
    return {
        table.name: {column["name"] for column in inspector.get_columns(table.name)}
        for table in _schema.metadata.sorted_tables
    }


def test_fresh_database_matches_the_table_definitions(db_url: str) -> None:
    engine = storage.open_engine(db_url)
    try:
        with engine.connect() as conn:
            assert storage.current_version(conn) == storage.SCHEMA_VERSION
        expected = {table.name: {c.name for c in table.columns} for table in _schema.metadata.sorted_tables}
        assert _column_names(engine) == expected
    finally:
        engine.dispose()
    assert _versions(db_url) == list(range(1, storage.SCHEMA_VERSION + 1))


def test_migrates_a_version_1_database_keeping_its_rows(db_url: str) -> None:
    raw = _raw_engine(db_url)
    with raw.begin() as conn:
        assert storage.migrate(conn, applied_at=0.0, target=1) == [1]
        conn.execute(
            sa.text(
                "INSERT INTO txrpc_request_log (identity, idempotency_key, method, fingerprint, state,"
                " attempt, response, created_at, completed_at, lease_expires_at)"
                " VALUES ('alice', 'k1', 'calc.add', :fp, 'completed', 1, :resp, 10.0, 11.0, 40.0)"
            ),
            {"fp": b"\x01" * 16, "resp": b"\x03"},
        )
    with raw.connect() as conn:
        assert storage.current_version(conn) == 1
        assert not sa.inspect(conn).has_table("txrpc_kv")
    raw.dispose()

    engine = storage.open_engine(db_url)
    try:
        with engine.connect() as conn:
            assert storage.current_version(conn) == storage.SCHEMA_VERSION
            record = storage.get_request(conn, "alice", "k1")
        assert record is not None
        assert record.response == b"\x03" and record.completed_at == 11.0
        assert record.replay_count == 0 and record.last_replayed_at is None  # added by migration 2
        fresh = {table.name: {c.name for c in table.columns} for table in _schema.metadata.sorted_tables}
        assert _column_names(engine) == fresh
        database = storage.Database(engine)
        tx = storage.KvTransaction(database, "ns")
        tx.put("x", 1)
        database.write_sync(tx.apply)
        assert database.read_sync(lambda conn: storage.kv_items(conn, "ns")) == {"x": 1}
    finally:
        engine.dispose()
    assert _versions(db_url) == list(range(1, storage.SCHEMA_VERSION + 1))


def test_failed_migration_leaves_the_old_version(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw_engine(db_url)
    with raw.begin() as conn:
        storage.migrate(conn, applied_at=0.0, target=1)
    raw.dispose()

    def broken(conn: sa.Connection) -> None:
        conn.execute(sa.text("CREATE TABLE txrpc_half_done (x INTEGER)"))
        raise RuntimeError("migration bug")

    bad = storage.Migration(2, "broken", broken)
    monkeypatch.setattr(_schema, "MIGRATIONS", (_schema.MIGRATIONS[0], bad))
    with pytest.raises(RuntimeError, match="migration bug"):
        storage.open_engine(db_url)
    monkeypatch.undo()
    assert _versions(db_url) == [1]
    raw = _raw_engine(db_url)
    with raw.connect() as conn:
        assert not sa.inspect(conn).has_table("txrpc_half_done")  # DDL rolled back with it
    raw.dispose()


def test_schema_too_new_is_refused_and_left_untouched(db_url: str) -> None:
    _open_and_close(db_url)
    newer = storage.SCHEMA_VERSION + 7
    raw = _raw_engine(db_url)
    with raw.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO txrpc_schema (version, description, applied_at) VALUES (:v, 'future', 0)"),
            {"v": newer},
        )
    raw.dispose()
    for read_only in (False, True):
        with pytest.raises(storage.SchemaTooNew) as caught:
            storage.open_engine(db_url, read_only=read_only)
        assert caught.value.found == newer and caught.value.known == storage.SCHEMA_VERSION
        message = str(caught.value)
        assert f"schema version {newer}" in message and f"up to version {storage.SCHEMA_VERSION}" in message
        assert "Upgrade txrpc" in message
    assert _versions(db_url) == [*range(1, storage.SCHEMA_VERSION + 1), newer]


def test_read_only_open_of_an_older_schema_says_so(db_url: str) -> None:
    raw = _raw_engine(db_url)
    with raw.begin() as conn:
        storage.migrate(conn, applied_at=0.0, target=1)
    raw.dispose()
    with pytest.raises(storage.SchemaTooOld, match=r"schema version 1; this txrpc reads version \d"):
        storage.open_engine(db_url, read_only=True)
    assert _versions(db_url) == [1]  # not migrated by a read-only open


def test_concurrent_opens_of_a_fresh_database_migrate_once(db_url: str) -> None:
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            _open_and_close(db_url)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _versions(db_url) == list(range(1, storage.SCHEMA_VERSION + 1))


# -- failures at open --------------------------------------------------------------


def test_garbage_file_is_reported_corrupt_and_not_modified(tmp_path: Path) -> None:
    path = tmp_path / "txrpc.db"
    garbage = b"definitely not an SQLite file\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(storage.StorageCorrupt) as caught:
        storage.open_engine(path)
    assert str(path) in str(caught.value) and "not a usable SQLite database" in str(caught.value)
    assert "backup" in str(caught.value)
    assert path.read_bytes() == garbage


def test_damaged_pages_are_reported_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "txrpc.db"
    _open_and_close(path)  # the last close checkpoints the WAL into the main file
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    assert len(data) >= 3 * page_size
    for offset in range(page_size, len(data)):  # every page but the header page
        data[offset] = (offset * 131 + 7) % 251
    path.write_bytes(bytes(data))
    with pytest.raises(storage.StorageCorrupt, match="not a usable SQLite database"):
        storage.open_engine(path)


def test_read_only_file_is_reported_at_open(tmp_path: Path) -> None:
    path = tmp_path / "txrpc.db"
    _open_and_close(path)
    with _read_only(path):
        with pytest.raises(storage.StorageReadOnly) as caught:
            storage.open_engine(path)
        message = str(caught.value)
        assert str(path) in message and "read-only" in message and "permissions" in message
        # Inspection still works on a read-only file.
        engine = storage.open_engine(path, read_only=True)
        with engine.connect() as conn:
            assert storage.current_version(conn) == storage.SCHEMA_VERSION
        engine.dispose()


@pytest.mark.postgres
def test_read_only_postgres_session_is_reported_at_open(postgres_url: str) -> None:
    _open_and_close(postgres_url)
    url = sa.make_url(postgres_url)
    options = url.query["options"]
    assert isinstance(options, str)
    read_only = url.update_query_dict({"options": options + " -cdefault_transaction_read_only=on"})
    with pytest.raises(storage.StorageReadOnly, match="read-only for this session"):
        storage.open_engine(read_only.render_as_string(hide_password=False))


def test_unreachable_postgres_is_reported_at_open() -> None:
    with pytest.raises(storage.StorageUnavailable, match=r"cannot reach database .*127\.0\.0\.1:1"):
        storage.open_engine("postgresql+psycopg://postgres@127.0.0.1:1/test", connect_timeout_s=2)


@pytest.mark.postgres
def test_missing_postgres_schema_is_reported_at_open(postgres_url: str) -> None:
    url = sa.make_url(postgres_url).update_query_dict({"options": "-csearch_path=txrpc_no_such_schema"})
    with pytest.raises(storage.StorageUnavailable, match="create the schema first"):
        storage.open_engine(url.render_as_string(hide_password=False))


def test_missing_directory_is_reported_at_open(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageUnavailable, match="does not exist"):
        storage.open_engine(tmp_path / "no" / "such" / "txrpc.db")


def test_create_false_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "txrpc.db"
    with pytest.raises(storage.NoSuchDatabase, match="nothing was created"):
        storage.open_engine(path, create=False)
    assert not path.exists()


# -- the trio facade -----------------------------------------------------------------


async def test_database_work_runs_on_worker_threads(db_url: str) -> None:
    engine = storage.open_engine(db_url)
    database = storage.Database(engine)
    try:
        loop_thread = threading.get_ident()
        read_thread = await database.read(lambda conn: threading.get_ident())
        write_thread = await database.write(lambda conn: threading.get_ident())
        assert loop_thread not in (read_thread, write_thread)
    finally:
        database.close()


async def test_failed_write_leaves_nothing(db_url: str) -> None:
    engine = storage.open_engine(db_url)
    database = storage.Database(engine)
    try:

        def write_then_fail(conn: sa.Connection) -> None:
            tx = storage.KvTransaction(database, "ns")
            tx.put("k", "v")
            tx.apply(conn)
            raise ValueError("handler bug")

        with pytest.raises(ValueError, match="handler bug"):
            await database.write(write_then_fail)
        assert await database.read(lambda conn: storage.kv_items(conn, "ns")) == {}
    finally:
        database.close()


def test_storage_imports_neither_txrpc_nor_coordinator() -> None:
    code = (
        "import sys, storage\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('txrpc', 'coordinator'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_only_open_refuses_writes(db_url: str) -> None:
    _open_and_close(db_url)
    engine = storage.open_engine(db_url, read_only=True)
    try:
        with engine.connect() as conn:
            assert storage.current_version(conn) == storage.SCHEMA_VERSION
        with pytest.raises(sa.exc.DBAPIError, match=r"(?i)read.?only"):
            with engine.begin() as conn:
                conn.execute(sa.text("DELETE FROM txrpc_schema"))
    finally:
        engine.dispose()
    assert _versions(db_url) == list(range(1, storage.SCHEMA_VERSION + 1))
