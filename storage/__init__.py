"""storage — txrpc's persistence: SQLAlchemy Core on worker threads, group-committed.

- :func:`open_engine` opens a SQLite file (WAL, ``synchronous=FULL``) or a PostgreSQL
  database (``postgresql+psycopg://``), creates and migrates the schema and turns
  every failure into a :class:`StorageError` that says what to do.
- :class:`Database` runs database work on worker threads for trio code.
- :class:`GroupCommitAppender` carries many writers' records in one transaction and
  one fsync and wakes each writer with its own result.
- :class:`RequestLog` is the idempotency request log; :class:`KvTransaction` a
  key-value store whose writes can commit with a request's completion record.
- :func:`open_storage` wires all of it together.
- :class:`ShardStore` and :class:`CoordinatorLog` (the commit protocol's durable state,
  ``specs/commit-protocol.md``) write through the same appender.

This package imports neither ``txrpc`` nor ``coordinator``. See ``specs/storage.md``.
"""

from ._appender import (
    BATCH_RECORDS_MAX_DEFAULT,
    QUEUE_RECORDS_MAX_DEFAULT,
    TRANSACT,
    AppenderStats,
    GroupCommitAppender,
    RecordKind,
    Rejected,
    apply_each,
    open_appender,
)
from ._coordinator_log import CoordinatorLog, DecisionExists
from ._database import READERS_MAX_DEFAULT, Database
from ._engine import (
    BUSY_TIMEOUT_S_DEFAULT,
    CONNECT_TIMEOUT_S_DEFAULT,
    SQLITE_FILE_NAME,
    display_url,
    open_engine,
    resolve_url,
)
from ._errors import (
    AppendQueueFull,
    BatchFailed,
    LeaseLost,
    NoSuchDatabase,
    SchemaTooNew,
    SchemaTooOld,
    StorageClosed,
    StorageCorrupt,
    StorageError,
    StorageReadOnly,
    StorageUnavailable,
    WriteConflict,
    stopping,
)
from ._kv import KvTransaction, kv_items, kv_read
from ._request_log import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    BeginResult,
    ExtraWrites,
    Outcome,
    RanResult,
    RequestLog,
    RequestLogStats,
    RequestRecord,
    RequestState,
    StoredError,
    count_replayable,
    find_requests,
    get_request,
    list_requests,
    prune_requests,
    replay_requests,
    request_stats,
)
from ._schema import MIGRATIONS, SCHEMA_VERSION, Migration, current_version, migrate
from ._shard_store import ShardStore
from ._storage import Storage, open_storage

__all__ = [
    "BATCH_RECORDS_MAX_DEFAULT",
    "BUSY_TIMEOUT_S_DEFAULT",
    "CONNECT_TIMEOUT_S_DEFAULT",
    "LIST_LIMIT_DEFAULT",
    "LIST_LIMIT_MAX",
    "MIGRATIONS",
    "QUEUE_RECORDS_MAX_DEFAULT",
    "READERS_MAX_DEFAULT",
    "SCHEMA_VERSION",
    "SQLITE_FILE_NAME",
    "TRANSACT",
    "AppendQueueFull",
    "AppenderStats",
    "BatchFailed",
    "BeginResult",
    "CoordinatorLog",
    "Database",
    "DecisionExists",
    "ExtraWrites",
    "Outcome",
    "RanResult",
    "GroupCommitAppender",
    "KvTransaction",
    "LeaseLost",
    "Migration",
    "NoSuchDatabase",
    "RecordKind",
    "Rejected",
    "RequestLog",
    "RequestLogStats",
    "RequestRecord",
    "RequestState",
    "SchemaTooNew",
    "SchemaTooOld",
    "ShardStore",
    "Storage",
    "StorageClosed",
    "StorageCorrupt",
    "StorageError",
    "StorageReadOnly",
    "StorageUnavailable",
    "StoredError",
    "WriteConflict",
    "apply_each",
    "count_replayable",
    "current_version",
    "display_url",
    "find_requests",
    "get_request",
    "kv_items",
    "kv_read",
    "list_requests",
    "migrate",
    "open_appender",
    "open_engine",
    "open_storage",
    "prune_requests",
    "replay_requests",
    "request_stats",
    "resolve_url",
    "stopping",
]
