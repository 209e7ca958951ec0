"""A small key-value table for handlers whose effects must commit with their log record.

:class:`KvTransaction` is an optimistic transaction over the ``txrpc_kv`` table:
``get`` reads committed values (on a reader thread) and remembers each key's version;
``put`` / ``delete`` only buffer. :meth:`KvTransaction.apply` then, inside some
write transaction, checks that every key read still has the version seen and
applies the buffered writes; if any read is stale it raises :class:`WriteConflict`
and the surrounding savepoint discards everything. Committed transactions are
therefore serializable (in commit order), and because ``apply`` is just a function
of a connection it can ride in the very transaction that records a request's
completion::

    tx = KvTransaction(database, namespace="bank")
    balance = await tx.get("alice", default=0)
    tx.put("alice", balance - 10)
    await request_log.complete(identity, key, attempt, now=now,
                               response=encoded, extra_writes=tx.apply)

Values are anything CBOR can encode; they are stored as canonical CBOR.
"""

from __future__ import annotations

from typing import Any

import cbor2
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._appender import GroupCommitAppender
from ._database import Database
from ._errors import WriteConflict
from ._schema import kv

_DELETED = object()
_ABSENT_VERSION = 0


def _encode(value: Any) -> bytes:
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise TypeError(f"value cannot be stored (not CBOR-encodable): {exc}") from None


def _decode(data: bytes) -> Any:
    return cbor2.loads(data)


def _where(namespace: str, key: str) -> sa.ColumnElement[bool]:
    return sa.and_(kv.c.namespace == namespace, kv.c.key == key)


def kv_read(conn: Connection, namespace: str, key: str) -> tuple[Any, int]:
    """``(value, version)`` of a committed key; ``(None, 0)`` when absent."""
    row = conn.execute(sa.select(kv.c.value, kv.c.version).where(_where(namespace, key))).one_or_none()
    if row is None:
        return None, _ABSENT_VERSION
    return _decode(bytes(row[0])), int(row[1])


def kv_items(conn: Connection, namespace: str) -> dict[str, Any]:
    """Every committed key of ``namespace`` with its value."""
    rows = conn.execute(sa.select(kv.c.key, kv.c.value).where(kv.c.namespace == namespace).order_by(kv.c.key))
    return {str(key): _decode(bytes(value)) for key, value in rows}


class KvTransaction:
    """Buffered, optimistically checked reads and writes on one ``namespace`` of ``txrpc_kv``.

    Not thread-safe and single-use: create one per request attempt.
    """

    def __init__(self, database: Database, namespace: str = "") -> None:
        self.database = database
        self.namespace = namespace
        self._reads: dict[str, tuple[Any, int]] = {}
        self._writes: dict[str, Any] = {}

    @property
    def read_keys(self) -> frozenset[str]:
        return frozenset(self._reads)

    @property
    def written_keys(self) -> frozenset[str]:
        return frozenset(self._writes)

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` as this transaction sees it (its own writes first,
        then the committed value, read once and remembered), or ``default``."""
        if key in self._writes:
            value = self._writes[key]
            return default if value is _DELETED else _decode(value)
        if key not in self._reads:
            namespace = self.namespace
            self._reads[key] = await self.database.read(lambda conn: kv_read(conn, namespace, key))
        value, version = self._reads[key]
        return default if version == _ABSENT_VERSION else value

    def put(self, key: str, value: Any) -> None:
        """Buffer a write of ``value`` (encoded now: raises ``TypeError`` if not CBOR-able)."""
        self._writes[key] = _encode(value)

    def delete(self, key: str) -> None:
        """Buffer a deletion of ``key`` (a no-op at apply time if it does not exist)."""
        self._writes[key] = _DELETED

    def check(self, conn: Connection) -> None:
        """Validate the reads only (write nothing): raise :class:`WriteConflict` if a key
        read has changed since. For an outcome decided on these reads whose writes are
        to be discarded (a handler that raised), pass it as ``extra_writes``."""
        ns = self.namespace
        on_postgres = conn.dialect.name == "postgresql"
        for key in sorted(self._reads):
            query = sa.select(kv.c.version).where(_where(ns, key))
            if on_postgres:
                query = query.with_for_update(read=True)
            current = conn.execute(query).scalar_one_or_none()
            if (current or _ABSENT_VERSION) != self._reads[key][1]:
                raise WriteConflict(f"key {key!r} in namespace {ns!r} changed after it was read")

    def apply(self, conn: Connection) -> None:
        """Validate the reads and apply the writes on ``conn``'s open transaction.

        Raises :class:`WriteConflict` if a key read has changed (or appeared, or
        vanished) since; the caller's savepoint must then roll back whatever this
        wrote before failing (``RequestLog.complete`` and ``appender.transact`` do).
        Keys are visited in sorted order.
        """
        ns = self.namespace
        on_postgres = conn.dialect.name == "postgresql"
        for key in sorted(self._reads):
            if key in self._writes:
                continue  # checked by the conditional write below
            query = sa.select(kv.c.version).where(_where(ns, key))
            if on_postgres:
                query = query.with_for_update(read=True)
            current = conn.execute(query).scalar_one_or_none()
            if (current or _ABSENT_VERSION) != self._reads[key][1]:
                raise WriteConflict(f"key {key!r} in namespace {ns!r} changed after it was read")
        for key in sorted(self._writes):
            value = self._writes[key]
            seen = self._reads[key][1] if key in self._reads else None
            if value is _DELETED:
                self._apply_delete(conn, key, seen)
            else:
                self._apply_put(conn, key, value, seen)

    def _apply_delete(self, conn: Connection, key: str, seen: int | None) -> None:
        ns = self.namespace
        if seen is None:
            conn.execute(sa.delete(kv).where(_where(ns, key)))
        elif seen == _ABSENT_VERSION:
            if conn.execute(sa.select(kv.c.version).where(_where(ns, key))).first() is not None:
                raise WriteConflict(f"key {key!r} in namespace {ns!r} appeared after it was read as absent")
        elif conn.execute(sa.delete(kv).where(_where(ns, key), kv.c.version == seen)).rowcount != 1:
            raise WriteConflict(f"key {key!r} in namespace {ns!r} changed after it was read")

    def _apply_put(self, conn: Connection, key: str, value: bytes, seen: int | None) -> None:
        ns = self.namespace
        if seen is None:  # blind write: last writer wins
            updated = conn.execute(
                sa.update(kv).where(_where(ns, key)).values(value=value, version=kv.c.version + 1)
            ).rowcount
            if updated == 1:
                return
            seen = _ABSENT_VERSION
        if seen == _ABSENT_VERSION:
            if conn.execute(sa.select(kv.c.version).where(_where(ns, key))).first() is not None:
                raise WriteConflict(f"key {key!r} in namespace {ns!r} appeared after it was read as absent")
            try:
                conn.execute(sa.insert(kv).values(namespace=ns, key=key, value=value, version=1))
            except sa.exc.IntegrityError as exc:  # another process inserted it meanwhile
                raise WriteConflict(f"key {key!r} in namespace {ns!r} was created concurrently") from exc
            return
        updated = conn.execute(
            sa.update(kv)
            .where(_where(ns, key), kv.c.version == seen)
            .values(value=value, version=kv.c.version + 1)
        ).rowcount
        if updated != 1:
            raise WriteConflict(f"key {key!r} in namespace {ns!r} changed after it was read")

    async def commit(self, appender: GroupCommitAppender) -> None:
        """Apply this transaction on its own through ``appender`` (durable on return).

        Raises :class:`WriteConflict` (nothing written) or the appender's errors.
        """
        if appender.database is not self.database:
            raise ValueError("the appender must write to the transaction's database")
        await appender.transact(self.apply)
