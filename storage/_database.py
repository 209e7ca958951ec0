"""The trio-facing facade over an engine: database work runs on worker threads.

Nothing here blocks the event loop: :meth:`Database.read` and :meth:`Database.write`
hand a function of a ``Connection`` to ``trio.to_thread.run_sync``. Reads run on up to
``readers_max`` threads at once; writes are serialized by :attr:`Database.write_lock`
(one writer at a time per engine, which is what SQLite allows anyway) and run in a
SQLite ``BEGIN IMMEDIATE`` transaction so they queue for the file lock up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection, Engine

from ._engine import WRITE_OPTION, display_url, translate_error
from ._errors import StorageCorrupt, StorageError, StorageReadOnly, StorageUnavailable
from ._threads import run_blocking

T = TypeVar("T")

READERS_MAX_DEFAULT = 4


class Database:
    """An opened engine plus the rules for using it from trio.

    ``readers_max`` bounds the threads running reads concurrently. The object may be
    created outside ``trio.run`` (the blocking ``*_sync`` methods work anywhere) and
    used from one trio run at a time.
    """

    def __init__(self, engine: Engine, *, readers_max: int = READERS_MAX_DEFAULT) -> None:
        if readers_max < 1:
            raise ValueError("readers_max must be >= 1")
        self.engine = engine
        self.url = display_url(engine.url)
        self.dialect: str = engine.dialect.name
        self.readers_max = readers_max
        self._read_limiter = trio.CapacityLimiter(readers_max)
        #: The writer thread: one write transaction runs at a time per engine.
        self.write_thread_limiter = trio.CapacityLimiter(1)
        #: Serializes this process's write transactions (the group-commit appender
        #: takes it per batch). Holding it pauses every writer, e.g. for a backup.
        self.write_lock = trio.Lock()

    # -- blocking API (worker threads, CLI) -------------------------------------------

    def read_sync(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in a read transaction (rolled back afterwards); blocking."""
        try:
            with self.engine.connect() as conn, conn.begin():
                return fn(conn)
        except sa.exc.DBAPIError as exc:
            translated = self._classified(exc)
            if translated is None:
                raise
            raise translated from exc

    def write_sync(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(conn)`` in one write transaction, committed if ``fn`` returns; blocking.

        The commit is durable when this returns (SQLite ``synchronous=FULL`` fsyncs
        the WAL; PostgreSQL flushes its WAL). If ``fn`` raises, nothing is written.
        Does not take :attr:`write_lock` (a trio lock): use :meth:`write` from trio.
        """
        try:
            with self.engine.connect() as conn:
                conn.execution_options(**{WRITE_OPTION: True})
                with conn.begin():
                    return fn(conn)
        except sa.exc.DBAPIError as exc:
            translated = self._classified(exc)
            if translated is None:
                raise
            raise translated from exc

    # -- trio API ----------------------------------------------------------------------

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """:meth:`read_sync` on a worker thread.

        Cancellation waits for the statement in flight to finish (a worker thread
        cannot be interrupted), then raises ``Cancelled``.
        """
        return await run_blocking(self.read_sync, fn, limiter=self._read_limiter)

    async def write(self, fn: Callable[[Connection], T]) -> T:
        """:meth:`write_sync` on the writer thread, holding :attr:`write_lock`.

        Returns once the transaction is durable. On cancellation while waiting for
        the lock nothing is written; once the transaction started it completes (and
        commits if ``fn`` returns) before ``Cancelled`` is raised.
        """
        async with self.write_lock:
            return await run_blocking(self.write_sync, fn, limiter=self.write_thread_limiter)

    def close(self) -> None:
        """Close pooled connections. Idempotent; the object is unusable afterwards."""
        self.engine.dispose()

    def _classified(self, exc: sa.exc.DBAPIError) -> StorageError | None:
        """Environmental failures become StorageError subclasses; logic errors (None) stay as they are."""
        translated = translate_error(exc, self.url)
        if isinstance(translated, StorageUnavailable | StorageReadOnly | StorageCorrupt):
            return translated
        return None

    def __repr__(self) -> str:
        return f"Database({self.url!r})"
