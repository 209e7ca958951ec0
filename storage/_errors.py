"""The storage error hierarchy.

Every error storage raises on purpose is a :class:`StorageError`; its message says
what went wrong *and* what to do about it. The original driver exception, when there
is one, is chained as ``__cause__``.
"""

from __future__ import annotations

import trio


class StorageError(Exception):
    """Base of every error the storage package raises deliberately."""


class StorageUnavailable(StorageError):
    """The database cannot be reached or opened (server down, missing directory, lost connection)."""


class StorageCorrupt(StorageError):
    """The file is not a database, or its pages are damaged."""


class StorageReadOnly(StorageError):
    """The database accepts reads but refuses writes (file permissions, read-only session)."""


class NoSuchDatabase(StorageError):
    """``create=False`` was asked for and there is no database at that location."""


class SchemaTooNew(StorageError):
    """The database was written by a newer txrpc; this code refuses to touch it.

    ``found`` is the database's schema version, ``known`` the newest this code knows.
    """

    def __init__(self, message: str, *, found: int, known: int) -> None:
        super().__init__(message)
        self.found = found
        self.known = known


class SchemaTooOld(StorageError):
    """A read-only open found a schema older than this code's; opening read-write migrates it.

    ``found`` is the database's schema version, ``known`` the newest this code knows.
    """

    def __init__(self, message: str, *, found: int, known: int) -> None:
        super().__init__(message)
        self.found = found
        self.known = known


class StorageClosed(StorageError):
    """The appender (or database) was closed; the record was not queued."""


class AppendQueueFull(StorageError):
    """The group-commit queue holds ``queue_records_max`` records; try again later.

    An RPC server maps this to ``RESOURCE_EXHAUSTED``.
    """


class BatchFailed(StorageError):
    """The transaction carrying a batch of records failed; every writer of the batch gets one.

    ``outcome_unknown`` is false when the batch was certainly rolled back (nothing of
    it is durable) and true when the failure struck during ``COMMIT`` itself (a lost
    connection, an I/O error): then the batch may or may not be durable and a caller
    that needs to know must read back. ``__cause__`` is the original exception.
    """

    def __init__(self, message: str, *, outcome_unknown: bool) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


def stopping(exc: BaseException) -> bool:
    """Did ``exc`` come from the storage being stopped under the write (the process is
    shutting down, or a simulated crash): the appender closed, or the batch's own write
    cancelled? Callers log such failures quietly: they are expected, not faults."""
    if isinstance(exc, StorageClosed):
        return True
    if isinstance(exc, BaseExceptionGroup):  # (several writes of one caller, all stopped)
        return all(stopping(inner) for inner in exc.exceptions)
    if isinstance(exc, BatchFailed) and not exc.outcome_unknown:
        return isinstance(exc.__cause__, trio.Cancelled)
    return False


class LeaseLost(StorageError):
    """A request-log update was guarded by an attempt number that is no longer current.

    Another executor took the request over (its lease had expired), or the request
    was completed, released or pruned meanwhile. Nothing was written.
    """


class WriteConflict(StorageError):
    """An optimistic key-value transaction read a key that changed before it committed.

    Nothing of the transaction was written; re-run it on fresh reads.
    """
