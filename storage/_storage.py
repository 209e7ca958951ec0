"""``open_storage``: engine + facade + group-commit appender + request log, as one unit."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._appender import (
    BATCH_RECORDS_MAX_DEFAULT,
    QUEUE_RECORDS_MAX_DEFAULT,
    GroupCommitAppender,
    open_appender,
)
from ._database import READERS_MAX_DEFAULT, Database
from ._engine import BUSY_TIMEOUT_S_DEFAULT, open_engine
from ._kv import KvTransaction
from ._request_log import RequestLog
from ._threads import run_blocking


@dataclasses.dataclass(frozen=True, slots=True)
class Storage:
    """An open database with its running appender and repositories."""

    database: Database
    appender: GroupCommitAppender
    request_log: RequestLog

    def kv_transaction(self, namespace: str = "") -> KvTransaction:
        """A fresh optimistic transaction on the ``txrpc_kv`` table (see :class:`KvTransaction`)."""
        return KvTransaction(self.database, namespace)


@asynccontextmanager
async def open_storage(
    url_or_path: str | os.PathLike[str],
    *,
    create: bool = True,
    batching: bool = True,
    pipelined_fsync: bool = False,
    inline_writes: bool = True,
    batch_records_max: int = BATCH_RECORDS_MAX_DEFAULT,
    queue_records_max: int = QUEUE_RECORDS_MAX_DEFAULT,
    readers_max: int = READERS_MAX_DEFAULT,
    busy_timeout_s: float = BUSY_TIMEOUT_S_DEFAULT,
) -> AsyncIterator[Storage]:
    """Open (create, migrate) the database on a worker thread and run its appender.

    ``pipelined_fsync`` (SQLite): flush the WAL beside the writer instead of inside each
    commit (see :class:`GroupCommitAppender`); only for readers that ``sync()`` before
    acting on a durable record they read, as the request log's server driver does.
    ``inline_writes`` (SQLite): write group-commit batches on the event loop's thread,
    never waiting there for another process's lock (see :class:`GroupCommitAppender`).

    Raises what :func:`open_engine` raises. On exit the appender drains its queue
    (or, if cancelled, fails what is queued with ``StorageClosed``) and the engine's
    connections are closed.
    """
    engine = await run_blocking(
        functools.partial(open_engine, url_or_path, create=create, busy_timeout_s=busy_timeout_s)
    )
    database = Database(engine, readers_max=readers_max)
    try:
        async with open_appender(
            database,
            batching=batching,
            pipelined_fsync=pipelined_fsync,
            inline_writes=inline_writes,
            batch_records_max=batch_records_max,
            queue_records_max=queue_records_max,
        ) as appender:
            yield Storage(database, appender, RequestLog(database, appender))
    finally:
        database.close()
