"""Group commit: many trio tasks' durable records ride on one transaction and one fsync.

Writers call :meth:`GroupCommitAppender.append` with a :class:`RecordKind` and a
record. Records queue in memory (at most ``queue_records_max``); one flusher task takes
up to ``batch_records_max`` of them, writes them in **one** transaction on the writer
thread and wakes each writer when its record is durable, handing it that record's own
result (an assigned log position, a row, ...). Records queued while a batch is being
written form the next batch, so batches grow exactly when the disk is the bottleneck
and no timer delays a lone writer.

A :class:`RecordKind` is "a function that writes a batch in one transaction":
``write_batch(conn, records) -> results``, one result per record, in order. Kinds
let each repository (request log, prepare log, decision log, commit log) insert its
records with one multi-row statement while still sharing the batch's transaction and
fsync with every other kind. Consecutive records of the same kind in the queue go to
one ``write_batch`` call; queue order is kept.

Failure semantics:

- a ``write_batch`` may return :class:`Rejected` for a record it refuses (a failed
  guard, a conflict). Only that record's writer gets the error; the writer function
  must leave no trace of the record (use a savepoint, see :func:`apply_each`);
- if a ``write_batch`` raises, or the transaction or its commit fails, the whole batch
  is rolled back and **every** writer of the batch gets a :class:`BatchFailed`
  (``outcome_unknown`` when the failure struck during ``COMMIT`` itself).

With ``batching=False`` every record gets its own transaction (the benchmark's
baseline); everything else is the same.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import itertools
import logging
import math
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import trio
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from . import _threads as storage_threads
from ._database import Database
from ._engine import APPENDER_TRANSACTION, WRITE_OPTION
from ._errors import AppendQueueFull, BatchFailed, StorageClosed, StorageUnavailable
from ._threads import run_blocking

R = TypeVar("R")
T = TypeVar("T")

log = logging.getLogger("txrpc.storage.appender")

BATCH_RECORDS_MAX_DEFAULT = 256
QUEUE_RECORDS_MAX_DEFAULT = 4096
CHECKPOINT_RECORDS = 2048
"""Inline writes: records committed between two WAL checkpoints (SQLite's own default
is every 1000 pages of WAL, a few thousand such records)."""
#: Inline writes: scheduler passes the flusher lets go by before it takes a batch.
LINGER_PASSES = 3
INLINE_BATCH_S_MAX = 0.005
"""``INLINE_SLOW_BATCHES`` inline batches in a row that each were blocked longer (a slow
disk's fsync), after a first slow one that starts the measuring, send the next batches to
a worker thread for ``INLINE_PAUSE_S``: the event loop waits this long at most a few times
per pause. (One slow batch alone proves little: a garbage collection or a busy neighbour
on a 2-core machine takes that long too.) On Linux "blocked" is the batch's wall time less
the time its thread ran or waited for a CPU (:class:`_ThreadRunTime`): on a machine whose
cores are all busy a batch takes long in wall time because the process waits for a core,
which a worker thread would not help."""
INLINE_SLOW_BATCHES = 3
INLINE_PAUSE_S = 10.0


class _ThreadRunTime:
    """Seconds the calling thread has run on a CPU or waited in a run queue for one, from
    Linux's ``/proc/thread-self/schedstat`` (``None`` where that is not available). The
    rest of a span of wall time is time the thread was blocked (in an fsync, say)."""

    _local = threading.local()

    @classmethod
    def now(cls) -> float | None:
        holder = getattr(cls._local, "holder", None)
        if holder is None:
            holder = cls._local.holder = _SchedstatFile()
        if holder.fd < 0:
            return None
        try:
            running_ns, waiting_ns, _ = os.pread(holder.fd, 96, 0).split()
            return (int(running_ns) + int(waiting_ns)) / 1e9
        except (OSError, ValueError):
            return None


def _forget_schedstat_files() -> None:
    # A forked child's copy of a thread's file would read the parent thread's counters.
    _ThreadRunTime._local = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_schedstat_files)


class _SchedstatFile:
    """The calling thread's schedstat file, open for the thread's life (closed with its
    thread-local holder)."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = -1

    def __del__(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


@dataclasses.dataclass(frozen=True, slots=True)
class Rejected:
    """A per-record failure returned by a batch writer instead of a result.

    The record's writer gets ``error`` raised; the rest of the batch commits. The
    batch writer must have undone everything the record wrote.
    """

    error: Exception


class RecordKind(Generic[R, T]):
    """A named way of writing records of type ``R`` that yields results of type ``T``.

    ``write_batch(conn, records)`` runs inside the batch's transaction (never commits
    or rolls it back itself) and returns exactly one ``T`` or :class:`Rejected` per
    record, in order. Define kinds once, at module level: records are grouped by
    kind identity.

    ``durable=False`` marks records that need to be *committed* when their writer
    wakes (visible to every connection and process, and surviving a crash of this
    process) but not yet flushed against power loss: a batch made only of such
    records commits without its own fsync (SQLite ``synchronous=NORMAL`` for that
    commit, PostgreSQL ``synchronous_commit=off``). The log is sequential, so the
    next durable commit flushes them too; a power loss can only lose a suffix of
    committed batches. A batch with any durable record is flushed as usual.
    """

    __slots__ = ("durable", "name", "write_batch")

    def __init__(
        self,
        name: str,
        write_batch: Callable[[Connection, Sequence[R]], Sequence[T | Rejected]],
        *,
        durable: bool = True,
    ) -> None:
        self.name = name
        self.write_batch = write_batch
        self.durable = durable

    def __repr__(self) -> str:
        return f"RecordKind({self.name!r})"


def apply_each(conn: Connection, functions: Sequence[Callable[[Connection], Any]]) -> list[Any]:
    """Batch writer for records that are functions of a connection.

    Each function runs in its own savepoint: one that raises is rolled back alone and
    its writer gets the exception (as :class:`Rejected`); the others commit.
    """
    results: list[Any] = []
    for function in functions:
        savepoint = conn.begin_nested()
        try:
            value = function(conn)
        except Exception as exc:
            savepoint.rollback()
            results.append(Rejected(exc))
        else:
            savepoint.commit()
            results.append(value)
    return results


#: Records are ``Callable[[Connection], T]``; see :meth:`GroupCommitAppender.transact`.
TRANSACT: RecordKind[Callable[[Connection], Any], Any] = RecordKind("transact", apply_each)


class _State(enum.Enum):
    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    WITHDRAWN = "withdrawn"


#: ``append_nowait``: called with (result, None) or (None, error) once the record is done.
Done = Callable[[Any, BaseException | None], None]


class _Pending:
    __slots__ = ("done", "error", "kind", "record", "state", "task", "value")

    def __init__(
        self, kind: RecordKind[Any, Any], record: Any, task: trio.lowlevel.Task | None, done: Done | None = None
    ) -> None:
        self.kind = kind
        self.record = record
        self.state = _State.QUEUED
        # The writer, parked until its record is done (None once it stopped waiting).
        # Rescheduled directly: a trio.Event per record costs measurably more.
        self.task = task
        self.done = done  # or, for append_nowait, what to call instead
        self.value: Any = None
        self.error: BaseException | None = None


class _WriterBusy(Exception):
    """Internal: an inline batch found the database locked by another connection (nothing done)."""


class _CommitFailed(Exception):
    """Internal: the failure happened in COMMIT (the outcome is unknown)."""


@dataclasses.dataclass(slots=True)
class AppenderStats:
    """Counters since the appender was created (a batch = one transaction)."""

    batches_committed: int = 0
    #: Of those, batches of non-durable records only, committed without a flush.
    batches_unflushed: int = 0
    records_committed: int = 0
    records_rejected: int = 0
    batches_failed: int = 0
    records_failed: int = 0
    largest_batch: int = 0
    #: ``pipelined_fsync``: WAL flushes done by the syncer (each covers many batches).
    wal_syncs: int = 0
    #: ``inline_writes``: batches that found the database locked by another process
    #: and were written on a worker thread; WAL checkpoints run between batches.
    batches_on_thread: int = 0
    checkpoints: int = 0
    #: ``inline_writes``: INLINE_SLOW_BATCHES inline batches in a row slower than
    #: INLINE_BATCH_S_MAX (threads for a while).
    inline_pauses: int = 0


class GroupCommitAppender:
    """Queues durable records from many tasks and commits them in batches.

    ``batch_records_max`` bounds the records in one transaction;
    ``queue_records_max`` bounds records waiting for a batch (beyond it
    :meth:`append` raises :class:`AppendQueueFull` at once: never an unbounded
    buffer, never a hidden wait). ``batching=False`` commits one record per
    transaction.

    ``pipelined_fsync=True`` (SQLite, with batching; ignored otherwise) takes the fsync
    out of the write lock: every batch commits without a flush (``synchronous=NORMAL``)
    and a separate syncer task fsyncs the WAL while the next batch is written; a
    durable record's writer wakes only after a WAL fsync that started after its
    commit. Writes stay durable when ``append`` returns, but a *reader* can see a
    committed durable record before it is flushed: a caller that acts on what it read
    (replays a stored outcome to a client) must ``await appender.sync()`` first. Only
    for databases whose readers follow that rule (the request log does).

    ``inline_writes`` (SQLite with batching; default on there) writes each batch on the
    event loop's own thread instead of handing it to a worker thread: on SQLite a batch
    is CPU work in the library plus one WAL fsync, and a thread hand-off costs as much
    as the batch (~150 µs of CPU on a 2-core VM, twice per batch). It never waits for
    another process there: the writer connection's busy timeout is zero on this path,
    and a batch that finds the database locked by another process (``txrpc log prune``,
    a second server on the file) is written on a worker thread, waiting out the busy
    timeout as before. WAL checkpoints, which SQLite would run inside a commit, run on
    a worker thread between batches (every ``CHECKPOINT_RECORDS`` records) instead.

    The flusher is :meth:`run`, which must run in a nursery while the appender is
    used; :func:`open_appender` does that.
    """

    def __init__(
        self,
        database: Database,
        *,
        batch_records_max: int = BATCH_RECORDS_MAX_DEFAULT,
        queue_records_max: int = QUEUE_RECORDS_MAX_DEFAULT,
        batching: bool = True,
        pipelined_fsync: bool = False,
        inline_writes: bool = True,
    ) -> None:
        if batch_records_max < 1 or queue_records_max < 1:
            raise ValueError("batch_records_max and queue_records_max must be >= 1")
        self.database = database
        self.inline_writes = inline_writes and batching and database.dialect == "sqlite"
        self._writer_waits = True  # the writer connection's busy timeout is the engine's (else 0)
        self._engine_busy_ms = 0  # read from the writer connection when it is opened
        self._records_since_checkpoint = 0
        self._inline_paused_until = -math.inf
        self._inline_slow = 0  # inline batches in a row blocked longer than INLINE_BATCH_S_MAX
        self._inline_measuring = False  # the last inline batch was slow: measure the next ones
        self.pipelined_fsync = pipelined_fsync and batching and database.dialect == "sqlite"
        self._unsynced: list[tuple[_Pending, Any]] = []
        self._sync_waiters: list[_SyncWaiter] = []
        self._syncer_wakeup = trio.Event()
        self._flusher_done = False
        self._sync_limiter = trio.CapacityLimiter(1)
        self.batch_records_max = batch_records_max if batching else 1
        self.queue_records_max = queue_records_max
        self.batching = batching
        self.stats = AppenderStats()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = trio.Event()
        self._closing = False
        self._running = False
        self._stopped = trio.Event()
        # SQLite: the flusher's own connection, kept checked out between batches (no pool
        # checkout and reset per batch) and dropped after a failed batch and at the end.
        # ``_writer_lazy``: its ``synchronous`` is NORMAL (else FULL, as pooled connections).
        self._writer: Connection | None = None
        self._writer_lazy = False

    @property
    def queued(self) -> int:
        """Records waiting for a batch (not counting the batch being written)."""
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closing

    async def append(self, kind: RecordKind[R, T], record: R) -> T:
        """Queue ``record`` and return its result once the batch carrying it is durable.

        Raises :class:`AppendQueueFull` (queue at ``queue_records_max``),
        :class:`StorageClosed` (appender closed) or ``RuntimeError`` (flusher never
        started) without queueing; :class:`BatchFailed`
        if its batch failed; or the record's own error if its kind rejected it.

        Cancellation: a record still waiting in the queue is withdrawn (it will not be
        written); once its batch is being written the record may still become durable
        after the caller stopped waiting — a caller that must know reads it back.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        pending = _Pending(kind, record, trio.lowlevel.current_task())
        self._queue.append(pending)
        self._wakeup.set()

        def abort(_: Any) -> trio.lowlevel.Abort:
            if pending.state is _State.QUEUED:
                self._queue.remove(pending)
                pending.state = _State.WITHDRAWN
            pending.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if pending.error is not None:
            raise pending.error
        return cast(T, pending.value)

    def append_nowait(
        self, kind: RecordKind[R, T], record: R, done: Callable[[T | None, BaseException | None], None]
    ) -> None:
        """Queue ``record`` without waiting: ``done(result, None)`` — or ``done(None, error)``
        with what :meth:`append` would have raised — is called once the batch carrying it
        is durable (or failed), from the flusher's task. ``done`` must not block or
        raise (what it raises is logged and dropped). Raises, without queueing, what
        :meth:`append` raises before queueing (:class:`AppendQueueFull`, ...).

        For callers with no task of their own to park: nothing can withdraw the record,
        so it is always written (or failed with its batch, or at close).
        """
        self._check_open()
        self._queue.append(_Pending(kind, record, None, done))
        self._wakeup.set()

    def _check_open(self) -> None:
        if self._closing:
            raise StorageClosed(f"the appender for {self.database.url} is closed")
        if not self._running:
            raise RuntimeError("the appender's flusher is not running: use open_appender() or start run()")
        if len(self._queue) >= self.queue_records_max:
            raise AppendQueueFull(
                f"{len(self._queue)} records already wait for a group commit on {self.database.url} "
                f"(queue_records_max={self.queue_records_max}); retry later"
            )

    async def sync(self) -> None:
        """Return once everything committed to the database so far — by this appender or
        any other connection or process — is flushed to disk.

        A no-op unless ``pipelined_fsync`` is on (otherwise every durable record was
        flushed by its own commit). Raises :class:`StorageUnavailable` if the flush fails.
        """
        if not self.pipelined_fsync:
            return
        if self._flusher_done:
            await run_blocking(self._fsync_wal, limiter=self._sync_limiter)
            return
        waiter = _SyncWaiter()
        self._sync_waiters.append(waiter)
        self._syncer_wakeup.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    async def transact(self, function: Callable[[Connection], T]) -> T:
        """Run ``function(conn)`` inside the next batch's transaction, in its own savepoint.

        Returns its value once durable. If it raises, only its own writes are rolled
        back and the exception is raised here; the rest of the batch commits.
        """
        return cast(T, await self.append(TRANSACT, function))

    def close(self) -> None:
        """Stop accepting records. The flusher commits what is queued, then :meth:`run` returns."""
        self._closing = True
        self._wakeup.set()

    async def aclose(self) -> None:
        """:meth:`close`, then wait until the queue is drained and the flusher stopped."""
        self.close()
        if self._running:
            await self._stopped.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: commit queued records in batches until closed and drained.

        If cancelled, the batch in flight completes and its writers are woken;
        records still queued get :class:`StorageClosed`.
        """
        if self._running:
            raise RuntimeError("GroupCommitAppender.run is already running")
        self._running = True
        if not self.pipelined_fsync:
            task_status.started()
            try:
                await self._flush_loop()
            finally:
                self._stopped.set()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._syncer)
                task_status.started()
                try:
                    await self._flush_loop()
                finally:
                    self._flusher_done = True
                    self._syncer_wakeup.set()
        finally:
            self._stopped.set()

    async def _flush_loop(self) -> None:
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        return
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                # Records keep queueing while we wait for the lock: a bigger batch.
                if self._next_batch_inline():
                    # Inline, a batch stops the event loop for its commit (CPU and the
                    # WAL flush): let the records that are on their way join it first.
                    # A few scheduler passes let the tasks that were woken meanwhile
                    # (handlers of requests already read, their replies) run and queue
                    # theirs. Fewer, bigger batches: fewer stops. On the 2-core benchmark
                    # machine (specs/storage.md): R = 3 +10 % transfers/s, R = 1 cross-
                    # shard +3 %, single-shard unchanged. Idle, a pass costs microseconds.
                    # (Not in the simulator: its clock stands still during the passes, so
                    # nothing more arrives and they only cost the run time.)
                    for _ in range(LINGER_PASSES):
                        await trio.lowlevel.cancel_shielded_checkpoint()
                async with self.database.write_lock:
                    batch = self._take_batch()
                    if batch:
                        await self._commit(batch)
                    if self.inline_writes:
                        await self._checkpoint_if_due()
        finally:
            self._closing = True
            while self._queue:
                pending = self._queue.popleft()
                message = f"the appender for {self.database.url} stopped before this record was written"
                self._finish(pending, None, StorageClosed(message))
            if self._writer is not None:
                with trio.CancelScope(shield=True):
                    await run_blocking(self._release_writer, limiter=self.database.write_thread_limiter)

    # -- the WAL syncer (pipelined_fsync) ------------------------------------------------

    async def _syncer(self) -> None:
        """Flush the WAL for committed durable records (and ``sync()`` callers), one
        fsync for everything committed before it started, while batches keep committing."""
        try:
            while True:
                while not self._unsynced and not self._sync_waiters:
                    if self._flusher_done:
                        return
                    self._syncer_wakeup = trio.Event()
                    await self._syncer_wakeup.wait()
                committed, self._unsynced = self._unsynced, []
                waiters, self._sync_waiters = self._sync_waiters, []
                try:
                    await run_blocking(self._fsync_wal, limiter=self._sync_limiter)
                except BaseException as exc:
                    self._fail_unsynced(committed, waiters, exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.stats.wal_syncs += 1
                for pending, value in committed:
                    self._finish(pending, value, None)
                for waiter in waiters:
                    waiter.done.set()
        finally:
            if self._unsynced or self._sync_waiters:
                committed, self._unsynced = self._unsynced, []
                waiters, self._sync_waiters = self._sync_waiters, []
                self._fail_unsynced(committed, waiters, StorageClosed("the appender stopped before flushing"))

    def _fail_unsynced(
        self, committed: list[tuple[_Pending, Any]], waiters: list[_SyncWaiter], exc: BaseException
    ) -> None:
        detail = f"{type(exc).__name__}: {exc}"
        for pending, _ in committed:
            failure = BatchFailed(
                f"flushing the WAL of {self.database.url} failed after the commit, outcome unknown: {detail}",
                outcome_unknown=True,
            )
            failure.__cause__ = exc
            self._finish(pending, None, failure)
        for waiter in waiters:
            waiter.error = StorageUnavailable(f"flushing the WAL of {self.database.url} failed: {detail}")
            waiter.done.set()

    def _fsync_wal(self) -> None:
        """Worker thread: fsync the SQLite WAL file (everything written to it so far).

        If there is no WAL file (checkpointed and removed: SQLite flushed the database
        file then), the database file is flushed instead.
        """
        path = Path(self.database.engine.url.database or "")
        for candidate in (Path(f"{path}-wal"), path):
            try:
                fd = os.open(candidate, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return

    # -- internals ---------------------------------------------------------------------

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.batch_records_max:
            pending = self._queue.popleft()
            pending.state = _State.IN_FLIGHT
            batch.append(pending)
        return batch

    def _finish(self, pending: _Pending, value: Any, error: BaseException | None) -> None:
        pending.value = value
        pending.error = error
        pending.state = _State.DONE
        task = pending.task
        if task is not None:
            pending.task = None
            trio.lowlevel.reschedule(task)
        elif pending.done is not None:
            done, pending.done = pending.done, None
            try:
                done(value, error)
            except Exception:
                log.exception("the done callback of a %r record raised (ignored)", pending.kind)

    def _next_batch_inline(self) -> bool:
        """Whether the next batch is written on the event loop's thread (else on a worker
        thread, or by the simulator's own storage calls)."""
        return (
            self.inline_writes
            and self._writer is not None  # (opening it may wait: that is done on a thread)
            and trio.current_time() >= self._inline_paused_until
            and storage_threads.inline.get() is None  # (the simulator has its own)
        )

    async def _run_batch(self, batch: list[_Pending]) -> list[Any]:
        if self.inline_writes:
            self._records_since_checkpoint += len(batch)  # (whichever way it is written)
        if self._next_batch_inline():
            await trio.lowlevel.checkpoint_if_cancelled()
            started = trio.current_time()
            # The thread's run time is read (a syscall) only while batches run slow: the
            # first slow batch after a fast one only starts the measuring.
            measured = self._inline_measuring
            ran_before = _ThreadRunTime.now() if measured else None
            try:
                results = self._write_inline(batch)
            except _WriterBusy:
                self.stats.batches_on_thread += 1  # another process holds the write lock
            except BaseException:
                with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await run_blocking(self._release_writer, limiter=self.database.write_thread_limiter)
                raise
            else:
                blocked_s = trio.current_time() - started
                if blocked_s <= INLINE_BATCH_S_MAX:
                    self._inline_slow = 0
                    self._inline_measuring = False
                elif not measured:
                    self._inline_measuring = True  # slow: the disk, or a busy CPU? measure the next
                else:
                    ran_after = _ThreadRunTime.now()
                    if ran_before is not None and ran_after is not None:
                        blocked_s -= ran_after - ran_before  # (running, or waiting for a core)
                    if blocked_s <= INLINE_BATCH_S_MAX:
                        self._inline_slow = 0
                    else:
                        self._inline_slow += 1
                        if self._inline_slow >= INLINE_SLOW_BATCHES:
                            # A slow disk (its fsync) would stop the event loop on every
                            # batch: worker threads for a while, then try again.
                            self._inline_slow = 0
                            self._inline_measuring = False
                            self._inline_paused_until = trio.current_time() + INLINE_PAUSE_S
                            self.stats.inline_pauses += 1
                await trio.lowlevel.cancel_shielded_checkpoint()
                return results
        return await run_blocking(self._write_batch_sync, batch, limiter=self.database.write_thread_limiter)

    @trio.lowlevel.enable_ki_protection
    def _write_inline(self, batch: list[_Pending]) -> list[Any]:
        # KI-protected: a Ctrl-C must not land between COMMIT and the writers' wake-up
        # (they would be told "rolled back" of a committed batch).
        return self._write_batch_sync(batch, inline=True)

    async def _checkpoint_if_due(self) -> None:
        """Inline writes: the WAL checkpoint SQLite would have run inside a commit, on a
        worker thread (PASSIVE: it copies what no reader still needs, waits for no one)."""
        if self._records_since_checkpoint < CHECKPOINT_RECORDS or self._writer is None:
            return
        self._records_since_checkpoint = 0
        writer = self._writer

        def checkpoint() -> None:
            writer.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # type: ignore[union-attr]

        try:
            await run_blocking(checkpoint, limiter=self.database.write_thread_limiter)
            self.stats.checkpoints += 1
        except Exception:
            # A fresh connection for the next batch; SQLite retries the checkpoint later.
            await run_blocking(self._release_writer, limiter=self.database.write_thread_limiter)

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = await self._run_batch(batch)
        except BaseException as exc:
            unknown = isinstance(exc, _CommitFailed)
            cause = exc.__cause__ if unknown and exc.__cause__ is not None else exc
            self.stats.batches_failed += 1
            self.stats.records_failed += len(batch)
            how = "outcome unknown (failed during COMMIT)" if unknown else "rolled back"
            for pending in batch:
                failure = BatchFailed(
                    f"group commit of {len(batch)} records on {self.database.url} failed, {how}: "
                    f"{type(cause).__name__}: {cause}",
                    outcome_unknown=unknown,
                )
                failure.__cause__ = cause
                self._finish(pending, None, failure)
            if not isinstance(exc, Exception):
                raise
            return
        self.stats.batches_committed += 1
        if not any(pending.kind.durable for pending in batch):
            self.stats.batches_unflushed += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        deferred = False
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Rejected):
                self.stats.records_rejected += 1
                self._finish(pending, None, result.error)
            else:
                self.stats.records_committed += 1
                if self.pipelined_fsync and pending.kind.durable:
                    self._unsynced.append((pending, result))  # woken by the syncer
                    deferred = True
                else:
                    self._finish(pending, result, None)
        if deferred:
            self._syncer_wakeup.set()

    def _write_batch_sync(self, batch: list[_Pending], inline: bool = False) -> list[Any]:
        """Worker thread (or the event loop, ``inline``): one transaction for the whole
        batch; raises to fail it, or :class:`_WriterBusy` (inline, nothing done) if
        another connection holds the database's write lock."""
        flush = any(pending.kind.durable for pending in batch)
        if self.database.dialect != "sqlite":
            # PostgreSQL: a pooled connection per batch (the pool's pre-ping replaces a
            # connection the server dropped before the batch starts on it).
            with self.database.engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                return self._write_in_transaction(conn, batch, flush)
        writer = self._writer
        if writer is None:
            writer = self.database.engine.connect()
            writer.execution_options(**{WRITE_OPTION: True})
            self._writer = writer
            self._writer_lazy = False
            self._writer_waits = True
            if self.inline_writes:  # checkpoints are the flusher's (_checkpoint_if_due)
                driver = writer.connection.driver_connection
                driver.execute("PRAGMA wal_autocheckpoint = 0")  # type: ignore[union-attr]
                # The engine's busy timeout (its connect hook set it), for thread batches.
                self._engine_busy_ms = int(driver.execute("PRAGMA busy_timeout").fetchone()[0])  # type: ignore[union-attr]
        if self._writer_waits == inline:
            # Inline, never wait for another process's lock (the event loop would stop).
            busy_ms = 0 if inline else self._engine_busy_ms
            writer.connection.driver_connection.execute(f"PRAGMA busy_timeout = {busy_ms}")  # type: ignore[union-attr]
            self._writer_waits = not inline
        try:
            # Pipelined: the syncer flushes the WAL for the durable records. The mode is
            # per connection and set outside a transaction, only when it changes.
            lazy = self.pipelined_fsync or not flush
            if lazy != self._writer_lazy:
                mode = "NORMAL" if lazy else "FULL"
                writer.connection.driver_connection.execute(f"PRAGMA synchronous = {mode}")  # type: ignore[union-attr]
                self._writer_lazy = lazy
            return self._write_in_transaction(writer, batch, flush, inline=inline)
        except _WriterBusy:
            raise  # nothing was done: the batch goes to a worker thread on this connection
        except BaseException:
            # Start the next batch on a fresh connection, as if each batch took its own;
            # the batch's own error (e.g. a failed COMMIT: outcome unknown) is what counts.
            # (Inline, the caller lets it go on a worker thread: closing may checkpoint.)
            if not inline:
                with contextlib.suppress(Exception):
                    self._release_writer()
            raise

    def _release_writer(self) -> None:
        """Worker thread: give the writer connection back to the pool, ``synchronous=FULL``
        restored (or discarded if that fails: never a weaker connection in the pool)."""
        conn = self._writer
        if conn is None:
            return
        self._writer = None
        if self.inline_writes:
            # Its busy timeout and checkpointing are the flusher's own: not for the pool.
            with contextlib.suppress(Exception):
                conn.invalidate()
        elif self._writer_lazy:
            self._writer_lazy = False
            _restore_full_sync(conn)
        try:
            conn.close()
        except Exception:
            with contextlib.suppress(Exception):
                conn.invalidate()

    def _write_in_transaction(
        self, conn: Connection, batch: list[_Pending], flush: bool, *, inline: bool = False
    ) -> list[Any]:
        if conn.dialect.name == "sqlite":
            return _write_in_sqlite_transaction(conn, batch, inline)
        try:
            transaction = conn.begin()
        except sa_exc.OperationalError as exc:
            if inline and "locked" in str(exc.orig):
                raise _WriterBusy() from exc
            raise
        try:
            if not flush and conn.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            results = _write_kinds(conn, batch)
        except BaseException:
            transaction.rollback()
            raise
        try:
            transaction.commit()
        except Exception as exc:
            raise _CommitFailed() from exc
        return results


def _write_kinds(conn: Connection, batch: list[_Pending]) -> list[Any]:
    """Each run of same-kind records in ``batch`` through its kind's ``write_batch``."""
    results: list[Any] = []
    for kind, group in itertools.groupby(batch, key=lambda pending: pending.kind):
        records = [pending.record for pending in group]
        written = kind.write_batch(conn, records)
        if len(written) != len(records):
            raise AssertionError(f"{kind!r}.write_batch returned {len(written)} results for {len(records)} records")
        results.extend(written)
    return results


def _write_in_sqlite_transaction(conn: Connection, batch: list[_Pending], inline: bool) -> list[Any]:
    """SQLite: the batch's ``BEGIN IMMEDIATE`` and ``COMMIT`` go straight to the driver.

    SQLAlchemy's own transaction (``conn.begin()``, its events, its commit path) cost
    several times SQLite's BEGIN and COMMIT -- paid once per batch, on every batch of a
    shard and of the coordinator. Kinds that run statements through SQLAlchemy still
    may: the first one makes SQLAlchemy begin, and its ``begin`` hook joins the driver's
    transaction, which the connection's ``info`` marks as the appender's
    (``APPENDER_TRANSACTION``, ``_engine._sqlite_engine``); the batch then ends through
    SQLAlchemy, so the connection's state stays what SQLAlchemy believes. While the mark
    is set, a kind that tries to commit or roll back fails the batch. Whatever happens,
    the driver is left outside any transaction (or the connection is discarded)."""
    driver = conn.connection.driver_connection
    assert driver is not None
    try:
        driver.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        if inline and "locked" in str(exc):
            raise _WriterBusy() from exc
        raise sa_exc.DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc
    info = conn.info
    info[APPENDER_TRANSACTION] = True
    try:
        results = _write_kinds(conn, batch)
    except BaseException:
        del info[APPENDER_TRANSACTION]
        _end_on_failure(conn, driver)
        raise
    del info[APPENDER_TRANSACTION]
    try:
        if conn.in_transaction():
            conn.commit()
        else:
            driver.commit()
    except Exception as exc:
        _end_on_failure(conn, driver)  # (a COMMIT that failed may leave SQLite's transaction open)
        if isinstance(exc, sqlite3.Error):
            raise _CommitFailed() from sa_exc.DBAPIError.instance("COMMIT", None, exc, sqlite3.Error)
        raise _CommitFailed() from exc
    return results


def _end_on_failure(conn: Connection, driver: Any) -> None:
    """After a failed batch: SQLAlchemy's transaction (if it began one) and the driver's
    ended; a connection whose driver transaction will not end is discarded, never
    pooled or reused with a transaction open (the next BEGIN would fail, or worse)."""
    try:
        if conn.in_transaction():
            conn.rollback()
        if driver.in_transaction:
            driver.rollback()
    except Exception:
        log.warning("rolling back a failed batch failed; discarding its connection", exc_info=True)
    try:
        still_open = driver.in_transaction
    except Exception:  # a closed or broken driver connection: discard it all the same
        still_open = True
    if still_open:
        # (Never raises over the batch's own error: the writers must hear that one --
        # e.g. "outcome unknown" for a failed COMMIT.)
        try:
            conn.invalidate()
        except Exception:
            log.warning("discarding the connection of a failed batch failed", exc_info=True)


class _SyncWaiter:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


def _restore_full_sync(conn: Connection) -> None:
    try:
        conn.connection.driver_connection.execute("PRAGMA synchronous = FULL")  # type: ignore[union-attr]
    except Exception:
        conn.invalidate()  # never hand a connection with weaker durability back to the pool


@asynccontextmanager
async def open_appender(
    database: Database,
    *,
    batch_records_max: int = BATCH_RECORDS_MAX_DEFAULT,
    queue_records_max: int = QUEUE_RECORDS_MAX_DEFAULT,
    batching: bool = True,
    pipelined_fsync: bool = False,
    inline_writes: bool = True,
) -> AsyncIterator[GroupCommitAppender]:
    """Run a :class:`GroupCommitAppender`'s flusher for the duration of the block.

    On a normal exit the appender is closed and everything queued is committed
    before the block returns; if the block is cancelled, queued records fail with
    :class:`StorageClosed`.
    """
    appender = GroupCommitAppender(
        database,
        batch_records_max=batch_records_max,
        queue_records_max=queue_records_max,
        batching=batching,
        pipelined_fsync=pipelined_fsync,
        inline_writes=inline_writes,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(appender.run)
        try:
            yield appender
        finally:
            appender.close()
