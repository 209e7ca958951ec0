"""GroupCommitAppender on real SQLite files and real PostgreSQL: batching, per-record
results, failure fan-out, bounds, cancellation and shutdown."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio
import trio.testing
from _trio_helpers import a_real_cancelled

import storage

journal_metadata = sa.MetaData()
journal = sa.Table(
    "test_journal",
    journal_metadata,
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("writer", sa.String, nullable=False, unique=True),
)


class JournalKind(storage.RecordKind[str, int]):
    """Appends one row per record (one multi-row INSERT per batch) and returns its position.

    Records every batch size it was called with: one call = one transaction.
    """

    def __init__(self) -> None:
        super().__init__("test.journal", self._write)
        self.batch_sizes: list[int] = []

    def _write(self, conn: sa.Connection, writers: Sequence[str]) -> list[int | storage.Rejected]:
        self.batch_sizes.append(len(writers))
        rows = conn.execute(
            sa.insert(journal).returning(journal.c.position, sort_by_parameter_order=True),
            [{"writer": writer} for writer in writers],
        )
        return [int(position) for position in rows.scalars()]


def _poison(conn: sa.Connection, records: Sequence[str]) -> list[int | storage.Rejected]:
    raise RuntimeError("poisoned batch")


POISON: storage.RecordKind[str, int] = storage.RecordKind("test.poison", _poison)


def _insert_without_guard(conn: sa.Connection, rows: Sequence[tuple[int, str]]) -> list[None]:
    conn.execute(sa.insert(journal), [{"position": p, "writer": w} for p, w in rows])
    return [None] * len(rows)


INSERT_AT: storage.RecordKind[tuple[int, str], None] = storage.RecordKind(
    "test.insert_at", _insert_without_guard
)


@asynccontextmanager
async def opened(db_url: str, **options: int | bool) -> AsyncIterator[storage.Storage]:
    async with storage.open_storage(db_url, **options) as st:  # type: ignore[arg-type]
        await st.database.write(lambda conn: journal_metadata.create_all(conn))
        yield st


def journal_rows(db_url: str) -> dict[int, str]:
    """The journal as a fresh engine sees it (what is committed, not what is cached)."""
    engine = sa.create_engine(db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return {int(p): str(w) for p, w in conn.execute(sa.select(journal.c.position, journal.c.writer))}
    finally:
        engine.dispose()


async def test_concurrent_writers_share_transactions_and_get_their_own_results(db_url: str) -> None:
    kind = JournalKind()
    results: dict[str, int] = {}
    writers = [f"w{i:02d}" for i in range(64)]

    async def write(name: str) -> None:
        results[name] = await st.appender.append(kind, name)

    async with opened(db_url) as st:
        async with trio.open_nursery() as nursery:
            for name in writers:
                nursery.start_soon(write, name)
        stats = st.appender.stats
    assert sorted(results) == writers
    assert len(set(results.values())) == len(writers)  # one position each
    committed = journal_rows(db_url)
    assert {name: position for position, name in committed.items()} == results
    assert sum(kind.batch_sizes) == len(writers)
    assert len(kind.batch_sizes) < len(writers), kind.batch_sizes  # fewer transactions than records
    assert max(kind.batch_sizes) > 1
    # The journal table's CREATE was one write transaction of its own, not through the appender.
    assert stats.batches_committed == len(kind.batch_sizes)
    assert stats.records_committed == len(writers)
    assert stats.largest_batch == max(kind.batch_sizes)


async def _queue_while_paused(st: storage.Storage, nursery: trio.Nursery, jobs: list[object]) -> None:
    """Start the jobs one by one (each has queued its record before the next starts) while the
    write lock is held, so they all queue, in list order, before a batch is taken."""
    async with st.database.write_lock:
        for job in jobs:
            nursery.start_soon(job)  # type: ignore[arg-type]
            await trio.testing.wait_all_tasks_blocked()
        assert st.appender.queued == len(jobs)


@pytest.mark.parametrize(("batching", "expected"), [(True, [4, 4, 2]), (False, [1] * 10)])
async def test_batch_size_is_bounded_and_batching_can_be_switched_off(
    db_url: str, batching: bool, expected: list[int]
) -> None:
    kind = JournalKind()
    async with opened(db_url, batch_records_max=4, batching=batching) as st:
        async with trio.open_nursery() as nursery:

            def job(i: int) -> object:
                return lambda: st.appender.append(kind, f"w{i}")

            await _queue_while_paused(st, nursery, [job(i) for i in range(10)])
        assert st.appender.stats.batches_committed == len(expected)
    assert kind.batch_sizes == expected
    # Queue order is commit order.
    committed = journal_rows(db_url)
    assert [committed[p] for p in sorted(committed)] == [f"w{i}" for i in range(10)]


async def test_a_failing_batch_wakes_every_writer_with_the_error(db_url: str) -> None:
    kind = JournalKind()
    errors: list[BaseException] = []

    async def write(record_kind: storage.RecordKind[str, int], name: str) -> None:
        try:
            await st.appender.append(record_kind, name)
        except storage.BatchFailed as exc:
            errors.append(exc)

    async with opened(db_url) as st:
        async with trio.open_nursery() as nursery:
            jobs: list[object] = [lambda i=i: write(kind, f"good{i}") for i in range(5)]
            jobs.insert(2, lambda: write(POISON, "poison"))
            await _queue_while_paused(st, nursery, jobs)
        assert len(errors) == 6
        for error in errors:
            assert isinstance(error, storage.BatchFailed)
            assert not error.outcome_unknown
            assert isinstance(error.__cause__, RuntimeError) and "poisoned batch" in str(error)
        assert len({id(error) for error in errors}) == 6  # one exception object per writer
        assert journal_rows(db_url) == {}  # the good records were rolled back with the batch
        assert st.appender.stats.batches_failed == 1 and st.appender.stats.records_failed == 6
        # The appender carries on.
        position = await st.appender.append(kind, "after")
    assert journal_rows(db_url) == {position: "after"}


async def test_a_database_error_fails_the_whole_batch(db_url: str) -> None:
    failures: list[storage.BatchFailed] = []

    async def write(position: int, name: str) -> None:
        try:
            await st.appender.append(INSERT_AT, (position, name))
        except storage.BatchFailed as exc:
            failures.append(exc)

    async with opened(db_url) as st:
        async with trio.open_nursery() as nursery:
            await _queue_while_paused(
                st, nursery, [lambda: write(1, "a"), lambda: write(2, "b"), lambda: write(1, "c")]
            )
    assert len(failures) == 3
    assert all(isinstance(f.__cause__, sa.exc.IntegrityError) for f in failures)
    assert journal_rows(db_url) == {}


def _raw_insert(conn: sa.Connection, rows: Sequence[tuple[int, str]]) -> list[None]:
    """Straight on the driver's cursor, as the shard store's and decision log's kinds do
    on SQLite: SQLAlchemy never sees a statement of the batch."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany("INSERT INTO test_journal (position, writer) VALUES (?, ?)", rows)
    finally:
        cursor.close()
    return [None] * len(rows)


RAW_INSERT_AT: storage.RecordKind[tuple[int, str], None] = storage.RecordKind("test.raw_insert_at", _raw_insert)


def _failure_noting(
    st: storage.Storage, failures: list[storage.BatchFailed]
) -> Callable[[storage.RecordKind[Any, Any], object], Awaitable[None]]:
    """``write(kind, record)``: append it, and note a ``BatchFailed`` in ``failures``
    instead of raising (several writers of one batch fail together)."""

    async def write(record_kind: storage.RecordKind[Any, Any], record: object) -> None:
        try:
            await st.appender.append(record_kind, record)
        except storage.BatchFailed as exc:
            failures.append(exc)

    return write


async def test_sqlite_batches_of_driver_statements_commit_and_roll_back_on_the_driver(sqlite_url: str) -> None:
    """A SQLite batch begins and commits on the driver. One whose kinds never go through
    SQLAlchemy commits (or rolls back) there too; one mixing both ends through SQLAlchemy.
    Either way the next batch starts on a clean connection."""
    failures: list[storage.BatchFailed] = []
    kind = JournalKind()

    async with opened(sqlite_url) as st:
        write = _failure_noting(st, failures)
        await st.appender.append(RAW_INSERT_AT, (1, "raw-alone"))
        async with trio.open_nursery() as nursery:  # a driver statement, then one that fails
            await _queue_while_paused(
                st, nursery, [lambda: write(RAW_INSERT_AT, (2, "raw")), lambda: write(POISON, "x")]
            )
        assert len(failures) == 2
        async with trio.open_nursery() as nursery:  # a driver statement, then a SQLAlchemy one
            await _queue_while_paused(
                st, nursery, [lambda: write(RAW_INSERT_AT, (3, "raw-mixed")), lambda: write(kind, "sa-mixed")]
            )
        async with trio.open_nursery() as nursery:  # both, then a failure: all rolled back
            await _queue_while_paused(
                st,
                nursery,
                [
                    lambda: write(kind, "sa-lost"),
                    lambda: write(RAW_INSERT_AT, (9, "raw-lost")),
                    lambda: write(POISON, "y"),
                ],
            )
        assert len(failures) == 5
        await st.appender.append(RAW_INSERT_AT, (10, "raw-after"))
        assert st.appender.stats.batches_failed == 2
    rows = journal_rows(sqlite_url)
    assert sorted(rows.values()) == ["raw-after", "raw-alone", "raw-mixed", "sa-mixed"], rows


def _writer_in_transaction(st: storage.Storage) -> bool:
    """Whether the appender's kept writer connection (if any) has a transaction open,
    as SQLAlchemy sees it or as the driver does."""
    writer = st.appender._writer
    if writer is None or writer.invalidated:
        return False
    return bool(writer.in_transaction() or writer.connection.driver_connection.in_transaction)  # type: ignore[union-attr]


async def test_a_sqlite_batch_leaves_no_transaction_open_on_its_connection(sqlite_url: str) -> None:
    failures: list[storage.BatchFailed] = []
    kind = JournalKind()

    async with opened(sqlite_url) as st:
        write = _failure_noting(st, failures)
        await st.appender.append(RAW_INSERT_AT, (1, "raw"))  # ended on the driver
        assert not _writer_in_transaction(st)
        await st.appender.append(kind, "sa")  # ended through SQLAlchemy
        assert not _writer_in_transaction(st)
        async with trio.open_nursery() as nursery:  # a savepoint first, after driver statements
            await _queue_while_paused(
                st,
                nursery,
                [
                    lambda: write(RAW_INSERT_AT, (10, "raw-then")),
                    lambda: write(storage.TRANSACT, lambda conn: conn.execute(sa.insert(journal), {"writer": "tx"})),
                ],
            )
        assert not failures and not _writer_in_transaction(st)
    assert sorted(journal_rows(sqlite_url).values()) == ["raw", "raw-then", "sa", "tx"]


def _commit_inside(conn: sa.Connection, records: Sequence[str]) -> list[None]:
    with conn.begin():  # not allowed: the batch's transaction is the appender's
        conn.execute(sa.insert(journal), [{"writer": w} for w in records])
    return [None] * len(records)


def _roll_back_inside(conn: sa.Connection, records: Sequence[str]) -> list[None]:
    conn.execute(sa.insert(journal), [{"writer": w} for w in records])
    conn.rollback()  # not allowed either
    return [None] * len(records)


@pytest.mark.parametrize("end", [_commit_inside, _roll_back_inside])
async def test_a_kind_that_ends_the_batchs_transaction_fails_the_batch_and_writes_nothing(
    sqlite_url: str, end: object
) -> None:
    rogue: storage.RecordKind[str, None] = storage.RecordKind("test.rogue", end)  # type: ignore[arg-type]
    failures: list[storage.BatchFailed] = []

    async with opened(sqlite_url) as st:
        write = _failure_noting(st, failures)
        async with trio.open_nursery() as nursery:
            await _queue_while_paused(
                st, nursery, [lambda: write(RAW_INSERT_AT, (1, "before")), lambda: write(rogue, "rogue")]
            )
        assert len(failures) == 2 and not any(f.outcome_unknown for f in failures)
        assert isinstance(failures[0].__cause__, sa.exc.InvalidRequestError)
        assert "may not" in str(failures[0].__cause__)
        await st.appender.append(RAW_INSERT_AT, (2, "after"))
    assert journal_rows(sqlite_url) == {2: "after"}


_FK_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS test_parent (id INTEGER PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS test_child (id INTEGER PRIMARY KEY, parent INTEGER "
    "REFERENCES test_parent(id) DEFERRABLE INITIALLY DEFERRED)",
]


def _orphan_through_sqlalchemy(conn: sa.Connection, ids: Sequence[int]) -> list[None]:
    for child in ids:
        conn.exec_driver_sql(f"INSERT INTO test_child (id, parent) VALUES ({child}, 999)")
    return [None] * len(ids)


def _orphan_on_the_driver(conn: sa.Connection, ids: Sequence[int]) -> list[None]:
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany("INSERT INTO test_child (id, parent) VALUES (?, 999)", [(i,) for i in ids])
    finally:
        cursor.close()
    return [None] * len(ids)


@pytest.mark.parametrize("inline_writes", [True, False])
@pytest.mark.parametrize("orphan", [_orphan_through_sqlalchemy, _orphan_on_the_driver])
async def test_a_failed_sqlite_commit_leaves_nothing_behind_for_the_next_transaction(
    sqlite_url: str, inline_writes: bool, orphan: object
) -> None:
    """COMMIT fails (a deferred foreign key), which leaves SQLite's transaction open on
    that connection: the batch is told "outcome unknown", and no later transaction --
    the next batch, or another write on a pooled connection -- runs inside it (and so
    commits the failed batch's rows with its own)."""
    kind: storage.RecordKind[int, None] = storage.RecordKind("test.orphan", orphan)  # type: ignore[arg-type]

    def schema(conn: sa.Connection) -> None:
        for statement in _FK_SCHEMA:
            conn.exec_driver_sql(statement)

    async with opened(sqlite_url, inline_writes=inline_writes) as st:
        await st.database.write(schema)
        with pytest.raises(storage.BatchFailed) as failed:
            await st.appender.append(kind, 1)
        assert failed.value.outcome_unknown
        cause = failed.value.__cause__
        assert isinstance(cause, sa.exc.IntegrityError) and "FOREIGN KEY" in str(cause)  # (wrapped, as any)
        assert not _writer_in_transaction(st)
        await st.database.write(lambda conn: conn.exec_driver_sql("INSERT INTO test_parent (id) VALUES (1)"))
        await st.appender.append(RAW_INSERT_AT, (5, "next batch"))
        children = await st.database.read(lambda conn: conn.exec_driver_sql("SELECT id FROM test_child").all())
        assert children == []
    assert journal_rows(sqlite_url) == {5: "next batch"}


class RollbackDenyingPoison(storage.RecordKind[str, int]):
    """Fails its batch, having first made SQLite refuse the next ROLLBACK on the batch's
    connection (an authorizer that denies it once): the appender's rollback of the batch
    fails for real and leaves the driver's transaction open. Records the connection
    and the thread it ran on."""

    def __init__(self) -> None:
        super().__init__("test.poison_denying_rollback", self._write)
        self.drivers: list[sqlite3.Connection] = []
        self.threads: list[int] = []
        self.denied: list[str] = []

    def _write(self, conn: sa.Connection, records: Sequence[str]) -> list[int | storage.Rejected]:
        driver = conn.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        self.drivers.append(driver)
        self.threads.append(threading.get_ident())

        def authorize(action: int, arg1: str | None, *_: object) -> int:
            if action == sqlite3.SQLITE_TRANSACTION and arg1 == "ROLLBACK" and not self.denied:
                self.denied.append(arg1)
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK

        driver.set_authorizer(authorize)
        raise RuntimeError("poisoned batch")


@pytest.mark.parametrize("through_sqlalchemy", [True, False], ids=["sqlalchemy", "driver"])
@pytest.mark.parametrize("inline_writes", [True, False], ids=["inline", "thread"])
async def test_a_sqlite_batch_whose_rollback_fails_discards_its_connection(
    sqlite_url: str, caplog: pytest.LogCaptureFixture, inline_writes: bool, through_sqlalchemy: bool
) -> None:
    """A batch fails and so does its ROLLBACK (SQLAlchemy's, if a kind went through it,
    else the driver's), which leaves SQLite's transaction open on that connection: every
    writer of the batch gets the error, the connection is discarded with a warning
    (closed, which ends the transaction; never pooled or reused with it open), and the
    next batch commits on another connection. (Inline, the flusher also drops its
    writer after any failed batch; on a worker thread, without the discard the pool
    would take the connection back, its reset's ROLLBACK succeeding this time.)"""
    poison = RollbackDenyingPoison()
    failures: list[storage.BatchFailed] = []
    lost: tuple[storage.RecordKind[Any, Any], object] = (
        (JournalKind(), "lost") if through_sqlalchemy else (RAW_INSERT_AT, (7, "lost"))
    )
    caplog.set_level(logging.WARNING, logger="txrpc.storage.appender")

    def insert_next(conn: sa.Connection) -> object:
        conn.execute(sa.insert(journal).values(position=2, writer="next batch"))
        return conn.connection.driver_connection

    async with opened(sqlite_url, inline_writes=inline_writes) as st:
        write = _failure_noting(st, failures)
        await st.appender.append(RAW_INSERT_AT, (1, "opens-the-writer"))  # (on a thread)
        async with trio.open_nursery() as nursery:
            await _queue_while_paused(st, nursery, [lambda: write(*lost), lambda: write(poison, "poison")])
        assert poison.denied == ["ROLLBACK"]  # the batch's rollback really failed
        assert (poison.threads == [threading.get_ident()]) == inline_writes  # inline: on the loop's thread
        assert len(failures) == 2 and not any(f.outcome_unknown for f in failures)
        assert all(isinstance(f.__cause__, RuntimeError) and "poisoned batch" in str(f) for f in failures)
        assert st.appender.stats.batches_failed == 1 and st.appender.stats.records_failed == 2
        [failed] = poison.drivers
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):  # discarded, not pooled
            failed.execute("SELECT 1")
        assert not _writer_in_transaction(st)
        assert journal_rows(sqlite_url) == {1: "opens-the-writer"}  # nothing of the failed batch
        assert await st.appender.transact(insert_next) is not failed
        count = sa.select(sa.func.count()).select_from(journal)
        assert await st.database.read(lambda conn: conn.execute(count).scalar()) == 2  # a pooled reader
    assert journal_rows(sqlite_url) == {1: "opens-the-writer", 2: "next batch"}
    [warning] = [r for r in caplog.records if "discarding its connection" in r.getMessage()]
    assert warning.name == "txrpc.storage.appender"
    assert warning.levelno == logging.WARNING
    assert warning.exc_info is not None and "not authorized" in str(warning.exc_info[1])
    # SQLAlchemy's rollback failed (it began, joining the batch's), else the driver's.
    assert isinstance(warning.exc_info[1], sa.exc.DatabaseError if through_sqlalchemy else sqlite3.DatabaseError)


def test_ending_a_failed_batch_on_a_closed_connection_discards_it_without_raising(tmp_path: Path) -> None:
    """A batch whose connection broke under it (the driver's connection closed): ending it
    must not raise over the batch's own error (a failed COMMIT must reach its writers
    as "outcome unknown", not as whatever asking a closed connection raises), and the
    connection is discarded, never pooled."""
    from storage._appender import _end_on_failure

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'closed.db'}")
    try:
        conn = engine.connect()
        driver = conn.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        driver.execute("BEGIN IMMEDIATE")
        driver.close()
        with pytest.raises(sqlite3.ProgrammingError):
            driver.in_transaction  # noqa: B018 (what _end_on_failure must not let escape)
        _end_on_failure(conn, driver)
        assert conn.invalidated
        conn.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize("linger_passes", [3, 0])
async def test_inline_records_on_their_way_join_the_batch(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, linger_passes: int
) -> None:
    """Inline, the flusher waits a few scheduler passes once woken before it takes a
    batch (``LINGER_PASSES``): records that tasks woken meanwhile queue join that batch,
    one commit (and one stop of the event loop) instead of two. Without the passes they
    miss it."""
    from storage import _appender

    monkeypatch.setattr(_appender, "LINGER_PASSES", linger_passes)
    async with opened(sqlite_url) as st:
        await st.appender.append(RAW_INSERT_AT, (1, "opens-the-writer"))
        before = st.appender.stats.batches_committed
        go = trio.Event()

        async def first() -> None:
            go.set()  # the others run from the next pass on
            await st.appender.append(RAW_INSERT_AT, (2, "first"))

        async def later(position: int) -> None:
            await go.wait()
            for _ in range(2):  # two passes later than the first record
                await trio.lowlevel.checkpoint()
            await st.appender.append(RAW_INSERT_AT, (position, f"later-{position}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(later, 3)
            nursery.start_soon(later, 4)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(first)
        batches = st.appender.stats.batches_committed - before
    assert batches == (1 if linger_passes else 2)
    assert journal_rows(sqlite_url) == {1: "opens-the-writer", 2: "first", 3: "later-3", 4: "later-4"}


async def test_a_rejected_record_fails_alone(db_url: str) -> None:
    kind = JournalKind()
    outcomes: dict[str, object] = {}

    def bad_write(conn: sa.Connection) -> int:
        conn.execute(sa.insert(journal).values(writer="bad"))
        raise ValueError("handler bug")

    async def run(name: str, job: object) -> None:
        try:
            outcomes[name] = await job  # type: ignore[misc]
        except ValueError as exc:
            outcomes[name] = exc

    async with opened(db_url) as st:
        before = st.appender.stats.batches_committed
        async with trio.open_nursery() as nursery:
            await _queue_while_paused(
                st,
                nursery,
                [
                    lambda: run("one", st.appender.append(kind, "one")),
                    lambda: run("bad", st.appender.transact(bad_write)),
                    lambda: run("two", st.appender.append(kind, "two")),
                    lambda: run("three", st.appender.transact(lambda conn: 3)),
                ],
            )
        assert st.appender.stats.batches_committed == before + 1  # all in one transaction
        assert st.appender.stats.records_rejected == 1
    assert isinstance(outcomes["bad"], ValueError)
    assert outcomes["three"] == 3
    assert sorted(journal_rows(db_url).values()) == ["one", "two"]  # "bad"'s insert rolled back alone


async def test_queue_bound_is_an_immediate_error(db_url: str) -> None:
    kind = JournalKind()
    async with opened(db_url, queue_records_max=5) as st:
        async with trio.open_nursery() as nursery:
            async with st.database.write_lock:
                for i in range(5):
                    nursery.start_soon(st.appender.append, kind, f"w{i}")
                await trio.testing.wait_all_tasks_blocked()
                assert st.appender.queued == 5
                with trio.fail_after(1):
                    with pytest.raises(storage.AppendQueueFull, match="queue_records_max=5"):
                        await st.appender.append(kind, "one too many")
    assert sorted(journal_rows(db_url).values()) == [f"w{i}" for i in range(5)]


async def test_cancelled_while_queued_is_withdrawn(db_url: str) -> None:
    kind = JournalKind()
    async with opened(db_url) as st:
        async with trio.open_nursery() as nursery:
            async with st.database.write_lock:
                scope = trio.CancelScope()

                async def cancelled_writer() -> None:
                    with scope:
                        await st.appender.append(kind, "withdrawn")

                nursery.start_soon(cancelled_writer)
                nursery.start_soon(st.appender.append, kind, "kept")
                await trio.testing.wait_all_tasks_blocked()
                assert st.appender.queued == 2
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert st.appender.queued == 1
    assert list(journal_rows(db_url).values()) == ["kept"]


async def test_close_commits_what_is_queued_and_refuses_more(db_url: str) -> None:
    kind = JournalKind()
    async with opened(db_url) as st:
        async with trio.open_nursery() as nursery:
            async with st.database.write_lock:
                for i in range(3):
                    nursery.start_soon(st.appender.append, kind, f"w{i}")
                await trio.testing.wait_all_tasks_blocked()
                st.appender.close()
                with pytest.raises(storage.StorageClosed):
                    await st.appender.append(kind, "late")
        await st.appender.aclose()
    assert sorted(journal_rows(db_url).values()) == ["w0", "w1", "w2"]


async def test_cancelling_the_flusher_fails_queued_records(db_url: str) -> None:
    kind = JournalKind()
    failures: list[BaseException] = []
    engine = storage.open_engine(db_url)
    database = storage.Database(engine)
    try:
        await database.write(lambda conn: journal_metadata.create_all(conn))
        appender = storage.GroupCommitAppender(database)

        async def write(name: str) -> None:
            try:
                await appender.append(kind, name)
            except storage.StorageClosed as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as flusher_nursery:
                await flusher_nursery.start(appender.run)
                async with database.write_lock:
                    nursery.start_soon(write, "a")
                    nursery.start_soon(write, "b")
                    await trio.testing.wait_all_tasks_blocked()
                    flusher_nursery.cancel_scope.cancel()  # a crash: the flusher dies with records queued
        assert len(failures) == 2 and appender.closed
    finally:
        database.close()
    assert journal_rows(db_url) == {}


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TXRPC_SLOW"), reason="timing comparison; set TXRPC_SLOW=1")
async def test_group_commit_outpaces_one_transaction_per_record(sqlite_url: str) -> None:
    async def rate(batching: bool) -> float:
        kind = JournalKind()
        async with opened(sqlite_url, batching=batching) as st:
            await st.database.write(lambda conn: conn.execute(sa.delete(journal)))
            writers, per_writer = 64, 20
            started = time.perf_counter()

            async def writer(w: int) -> None:
                for i in range(per_writer):
                    await st.appender.append(kind, f"{batching}-{w}-{i}")

            async with trio.open_nursery() as nursery:
                for w in range(writers):
                    nursery.start_soon(writer, w)
            return writers * per_writer / (time.perf_counter() - started)

    single, grouped = await rate(False), await rate(True)
    assert math.isfinite(single) and grouped > 3 * single, (single, grouped)


class ThreadRecordingKind(JournalKind):
    """A journal kind that also records which thread wrote each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def _write(self, conn: sa.Connection, writers: Sequence[str]) -> list[int | storage.Rejected]:
        import threading

        self.threads.append(threading.get_ident())
        return super()._write(conn, writers)


async def test_inline_batches_never_wait_on_the_event_loop_for_another_process(sqlite_url: str) -> None:
    """SQLite batches are written on the event loop's thread; while another connection
    (another process) holds the write lock, the batch waits on a worker thread instead,
    the loop keeps running, and the record is committed once the lock is let go."""
    import sqlite3
    import threading

    kind = ThreadRecordingKind()
    async with opened(sqlite_url) as st:
        assert st.appender.inline_writes
        await st.appender.append(JournalKind(), "warm-up")  # opens the writer (on a thread)
        assert await st.appender.append(kind, "first") == 2
        assert kind.threads == [threading.get_ident()]
        other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process's write transaction
            ticks = 0
            result: list[int] = []

            async def append() -> None:
                result.append(await st.appender.append(kind, "second"))

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(append)
                    for _ in range(20):  # the loop is not blocked while the record waits
                        await trio.sleep(0.01)
                        ticks += 1
                    assert not result and ticks == 20
                    other.execute("COMMIT")
            assert result == [3]
        finally:
            other.close()
        assert len(kind.threads) == 2 and kind.threads[1] != threading.get_ident()
        assert st.appender.stats.batches_on_thread == 1
        assert await st.appender.append(kind, "third") == 4  # and back inline
        assert kind.threads[2] == threading.get_ident()
    assert journal_rows(sqlite_url) == {1: "warm-up", 2: "first", 3: "second", 4: "third"}


async def test_a_slow_inline_batch_sends_the_next_ones_to_a_thread_for_a_while(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk must not stop the event loop batch after batch: INLINE_SLOW_BATCHES
    inline batches in a row slower than INLINE_BATCH_S_MAX (after a first slow one, which
    only starts the measuring) send the following ones to a worker thread for
    INLINE_PAUSE_S, then inline is tried again. A fast batch in between starts the count
    afresh (one slow batch is a hiccup, not a slow disk)."""
    import threading

    import storage._appender as appender_module

    kind = ThreadRecordingKind()
    async with opened(sqlite_url) as st:
        # "fast" must be fast whatever the machine does meanwhile (a preemption longer than
        # the default 5 ms would make it slow and shift the count by one).
        monkeypatch.setattr(appender_module, "INLINE_BATCH_S_MAX", 60.0)
        await st.appender.append(kind, "opens-the-writer")  # on a thread
        await st.appender.append(kind, "fast")
        monkeypatch.setattr(appender_module, "INLINE_SLOW_BATCHES", 2)
        monkeypatch.setattr(appender_module, "INLINE_BATCH_S_MAX", -1.0)  # every batch is "slow"
        monkeypatch.setattr(appender_module, "INLINE_PAUSE_S", 0.2)
        await st.appender.append(kind, "slow 0")  # inline, slow: starts measuring, not counted
        await st.appender.append(kind, "slow 1")  # inline, slow: one is a hiccup
        monkeypatch.setattr(appender_module, "INLINE_BATCH_S_MAX", 60.0)
        await st.appender.append(kind, "fast again")  # inline, fast: the count starts afresh
        monkeypatch.setattr(appender_module, "INLINE_BATCH_S_MAX", -1.0)
        await st.appender.append(kind, "slow 2")  # inline, slow: measuring starts again
        await st.appender.append(kind, "slow 3")  # inline, slow: one
        assert st.appender.stats.inline_pauses == 0
        await st.appender.append(kind, "slow 4")  # inline, slow: two in a row, pause
        assert st.appender.stats.inline_pauses == 1
        await st.appender.append(kind, "paused")  # on a thread
        await trio.sleep(0.3)
        await st.appender.append(kind, "again")  # inline again
        loop = threading.get_ident()
        assert [t == loop for t in kind.threads] == [False, True, True, True, True, True, True, True, False, True]


class SlowKind(ThreadRecordingKind):
    """Its batches take ``spend_s`` of wall time, either blocked (sleeping: a slow disk's
    fsync) or running (a busy CPU)."""

    def __init__(self, spend_s: float) -> None:
        super().__init__()
        self.spend_s = spend_s
        self.how = "blocked"

    def _write(self, conn: sa.Connection, writers: Sequence[str]) -> list[int | storage.Rejected]:
        import time

        if self.how == "blocked":
            time.sleep(self.spend_s)
        else:
            until = time.perf_counter() + self.spend_s
            while time.perf_counter() < until:
                pass
        return super()._write(conn, writers)


@pytest.mark.skipif(not os.path.exists("/proc/thread-self/schedstat"), reason="needs Linux's schedstat")
async def test_only_time_blocked_counts_against_inline_batches(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that takes long because it runs (or waits for a core: every core busy) is
    no slow disk: a worker thread would not help it. Only the time its thread was blocked
    counts towards INLINE_BATCH_S_MAX. (With wall time, a saturated 2-core machine paused
    the inline path for most of a `txrpc bench tx` run.)"""
    import storage._appender as appender_module

    kind = SlowKind(0.03)
    async with opened(sqlite_url) as st:
        await st.appender.append(JournalKind(), "opens-the-writer")  # on a thread
        monkeypatch.setattr(appender_module, "INLINE_SLOW_BATCHES", 2)
        monkeypatch.setattr(appender_module, "INLINE_BATCH_S_MAX", 0.02)
        kind.how = "running"
        for i in range(3):
            await st.appender.append(kind, f"busy {i}")
        assert st.appender.stats.inline_pauses == 0
        kind.how = "blocked"
        for i in range(2):
            await st.appender.append(kind, f"blocked {i}")
        assert st.appender.stats.inline_pauses == 1


async def test_inline_writes_checkpoint_the_wal_between_batches(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With inline writes SQLite's own checkpoint-in-commit is off; the flusher copies
    the WAL into the database file on a worker thread every CHECKPOINT_RECORDS."""
    import storage._appender as appender_module

    monkeypatch.setattr(appender_module, "CHECKPOINT_RECORDS", 50)
    path = sqlite_url.removeprefix("sqlite:///")
    kind = JournalKind()
    async with opened(sqlite_url) as st:
        await st.appender.append(kind, "warm-up")
        size_before = os.path.getsize(path)
        for i in range(300):
            await st.appender.append(kind, f"w{i}-" + "x" * 200)
        assert st.appender.stats.checkpoints >= 5
        assert os.path.getsize(path) > size_before  # pages reached the database file
    assert len(journal_rows(sqlite_url)) == 301


async def test_inline_batches_are_protected_from_ctrl_c(sqlite_url: str) -> None:
    """An inline batch runs KI-protected: a KeyboardInterrupt cannot land between its
    COMMIT and its writers' wake-up (they would hear "rolled back" of a committed batch)."""
    import threading

    protected: list[tuple[bool, bool]] = []  # (on the loop's thread, KI-protected)

    def write(conn: sa.Connection, records: Sequence[str]) -> list[None]:
        protected.append((threading.get_ident() == loop, trio.lowlevel.currently_ki_protected()))
        return [None] * len(records)

    kind: storage.RecordKind[str, None] = storage.RecordKind("test.ki", write)
    loop = threading.get_ident()
    async with opened(sqlite_url) as st:
        await st.appender.append(kind, "opens-the-writer")  # on a thread
        await st.appender.append(kind, "inline")
    assert protected[1] == (True, True)


@pytest.mark.skipif(
    not hasattr(os, "fork") or not os.path.exists("/proc/thread-self/schedstat"), reason="needs fork and schedstat"
)
def test_a_forked_child_measures_its_own_thread() -> None:
    """The thread's schedstat file is opened once per thread; a forked child (the
    simulator's worker pool) must not keep reading its parent thread's counters."""
    from storage._appender import _ThreadRunTime

    assert _ThreadRunTime.now() is not None  # opened in this (parent) thread
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        fresh = getattr(_ThreadRunTime._local, "holder", None) is None
        os.write(write_end, b"1" if fresh else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    os.close(write_end)


async def test_failures_from_a_stop_are_told_apart_from_faults(db_url: str) -> None:
    """``storage.stopping``: the appender closed, or a batch rolled back because its write
    was cancelled (the process stopping under it) -- expected, logged quietly by the
    callers -- against every other failure, a fault."""
    kind = JournalKind()
    async with opened(db_url) as st:
        st.appender.close()
        with pytest.raises(storage.StorageClosed) as closed:
            await st.appender.append(kind, "late")
        await st.appender.aclose()
    assert storage.stopping(closed.value)

    cancelled = await a_real_cancelled()
    rolled_back = storage.BatchFailed("group commit failed, rolled back: Cancelled", outcome_unknown=False)
    rolled_back.__cause__ = cancelled
    assert storage.stopping(rolled_back)
    unknown = storage.BatchFailed("failed during COMMIT: Cancelled", outcome_unknown=True)
    unknown.__cause__ = cancelled
    assert not storage.stopping(unknown)  # it may be durable: the caller must find out, not shrug
    faulty = storage.BatchFailed("group commit failed, rolled back: disk I/O error", outcome_unknown=False)
    faulty.__cause__ = OSError("disk I/O error")
    assert not storage.stopping(faulty)
    assert not storage.stopping(ValueError("a bug"))
    # Several writes of one caller in a nursery: a stop only if every one of them stopped.
    assert storage.stopping(ExceptionGroup("writes", [closed.value, rolled_back]))
    assert not storage.stopping(ExceptionGroup("writes", [closed.value, faulty]))
