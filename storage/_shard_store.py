"""A shard's durable state: its key-value data, its commit log and its prepare records.

One :class:`ShardStore` per shard (several may share one database: rows carry the shard
name). The participant is the only writer of its shard, so log positions are assigned
here in memory, and a bounded read cache stays coherent (it is updated on commit).
Every durable change goes through the group-commit appender.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import cbor2
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._appender import GroupCommitAppender, RecordKind
from ._database import Database
from ._txn_schema import commit_log, prepared, shard_data

CACHE_ENTRIES_MAX_DEFAULT = 100_000
SCAN_ROWS_MAX = 10_000

# A write set is a list of [key, deleted, value] triples (value None when deleted).
WriteSet = list[tuple[str, bool, Any]]


def encode(value: Any) -> bytes:
    return cbor2.dumps(value)


def decode(data: bytes) -> Any:
    return cbor2.loads(data)


class ShardStore:
    """Durable state of one shard (see module docstring).

    Reads (:meth:`get`, :meth:`scan`) return committed data only; buffered writes of
    open transactions live in the participant, not here.
    """

    def __init__(
        self,
        database: Database,
        appender: GroupCommitAppender,
        shard: str,
        *,
        cache_entries_max: int = CACHE_ENTRIES_MAX_DEFAULT,
    ) -> None:
        self.database = database
        self.appender = appender
        self.shard = shard
        self.cache_entries_max = cache_entries_max
        self._cache: OrderedDict[str, tuple[bool, Any]] = OrderedDict()
        self.next_position = 1
        self._opened = False

    async def open(self) -> list[tuple[int, WriteSet, list[tuple[Any, str]]]]:
        """Load the log position and return the prepare records (recovery input)."""
        shard = self.shard

        def load(conn: Connection) -> tuple[int, list[tuple[int, WriteSet, list[tuple[Any, str]]]]]:
            top = conn.execute(
                sa.select(sa.func.max(commit_log.c.position)).where(commit_log.c.shard == shard)
            ).scalar()
            rows = conn.execute(
                sa.select(prepared.c.txid, prepared.c.writes, prepared.c.locks)
                .where(prepared.c.shard == shard)
                .order_by(prepared.c.txid)
            ).all()
            records = [
                (int(r.txid), _writes_from_wire(decode(r.writes)), _locks_from_wire(decode(r.locks)))
                for r in rows
            ]
            return int(top or 0), records

        top, records = await self.database.read(load)
        self.next_position = top + 1
        self._opened = True
        return records

    # --- reads --------------------------------------------------------------------------

    async def get(self, key: str) -> tuple[bool, Any]:
        """(found, value) of the committed value of ``key``."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        shard = self.shard

        def read(conn: Connection) -> tuple[bool, Any]:
            row = conn.execute(
                sa.select(shard_data.c.value).where(shard_data.c.shard == shard, shard_data.c.key == key)
            ).first()
            return (False, None) if row is None else (True, decode(row.value))

        found = await self.database.read(read)
        self._remember(key, found)
        return found

    def _remember(self, key: str, entry: tuple[bool, Any]) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_entries_max:
            self._cache.popitem(last=False)

    async def scan(self, prefix: str, limit: int = SCAN_ROWS_MAX) -> list[tuple[str, Any]]:
        """Committed (key, value) pairs whose key starts with ``prefix``, in key order."""
        shard = self.shard
        limit = min(limit, SCAN_ROWS_MAX)

        def read(conn: Connection) -> list[tuple[str, Any]]:
            query = sa.select(shard_data.c.key, shard_data.c.value).where(shard_data.c.shard == shard)
            if prefix:
                upper = prefix[:-1] + chr(ord(prefix[-1]) + 1)
                query = query.where(shard_data.c.key >= prefix, shard_data.c.key < upper)
            rows = conn.execute(query.order_by(shard_data.c.key).limit(limit)).all()
            return [(r.key, decode(r.value)) for r in rows]

        return await self.database.read(read)

    async def is_committed(self, txid: int) -> bool:
        shard = self.shard

        def read(conn: Connection) -> bool:
            row = conn.execute(
                sa.select(commit_log.c.position)
                .where(commit_log.c.shard == shard, commit_log.c.txid == txid)
                .limit(1)
            ).first()
            return row is not None

        return await self.database.read(read)

    # --- durable writes ------------------------------------------------------------------

    async def write_prepare(self, txid: int, writes: WriteSet, locks: Sequence[tuple[Any, str]]) -> None:
        """Make the prepare record (write set + locks) durable."""
        row = {
            "shard": self.shard,
            "txid": txid,
            "writes": encode(_writes_to_wire(writes)),
            "locks": encode([[_resource_to_wire(r), m] for r, m in locks]),
            "prepared_at": time.time(),
        }
        await self.appender.append(PREPARE_RECORDS, row)

    async def delete_prepare(self, txid: int) -> None:
        await self.appender.append(DROP_PREPARE_RECORDS, (self.shard, txid))

    async def apply_commit(self, txid: int, writes: WriteSet) -> int:
        """Apply ``writes``, append the commit-log entry and drop the prepare record,
        in one local transaction. Returns the entry's log position."""
        position = self.next_position
        self.next_position += 1
        entry = _CommitEntry(self.shard, position, txid, writes, time.time())
        try:
            result: int = await self.appender.append(COMMITS, entry)
        except BaseException:
            self._cache.clear()  # the outcome may be unknown: re-read from the database
            raise
        for key, deleted, value in writes:
            self._remember(key, (False, None) if deleted else (True, value))
        return result

    # --- log and digest -------------------------------------------------------------------

    async def log_entries(
        self, since_position: int = 0, limit: int = 1000
    ) -> list[tuple[int, int, WriteSet]]:
        shard = self.shard

        def read(conn: Connection) -> list[tuple[int, int, WriteSet]]:
            rows = conn.execute(
                sa.select(commit_log.c.position, commit_log.c.txid, commit_log.c.writes)
                .where(commit_log.c.shard == shard, commit_log.c.position > since_position)
                .order_by(commit_log.c.position)
                .limit(limit)
            ).all()
            return [(int(r.position), int(r.txid), _writes_from_wire(decode(r.writes))) for r in rows]

        return await self.database.read(read)

    async def digest(self) -> tuple[int, str]:
        """(last applied position, blake2b digest of the committed key/value state)."""
        shard = self.shard

        def read(conn: Connection) -> tuple[int, str]:
            h = hashlib.blake2b(digest_size=16)
            rows = conn.execute(
                sa.select(shard_data.c.key, shard_data.c.value)
                .where(shard_data.c.shard == shard)
                .order_by(shard_data.c.key)
            )
            for row in rows:
                h.update(encode([row.key, row.value]))
            top = conn.execute(
                sa.select(sa.func.max(commit_log.c.position)).where(commit_log.c.shard == shard)
            ).scalar()
            return int(top or 0), h.hexdigest()

        return await self.database.read(read)

    async def items(self) -> dict[str, Any]:
        shard = self.shard

        def read(conn: Connection) -> dict[str, Any]:
            rows = conn.execute(
                sa.select(shard_data.c.key, shard_data.c.value).where(shard_data.c.shard == shard)
            )
            return {r.key: decode(r.value) for r in rows}

        return await self.database.read(read)


def apply_writes(conn: Connection, shard: str, writes: WriteSet) -> None:
    """Upsert/delete ``writes`` into the shard's data (inside the caller's transaction)."""
    deletes = [key for key, deleted, _ in writes if deleted]
    if deletes:
        conn.execute(sa.delete(shard_data).where(shard_data.c.shard == shard, shard_data.c.key.in_(deletes)))
    puts = [
        {"shard": shard, "key": key, "value": encode(value)} for key, deleted, value in writes if not deleted
    ]
    if puts:
        keys = [p["key"] for p in puts]
        conn.execute(sa.delete(shard_data).where(shard_data.c.shard == shard, shard_data.c.key.in_(keys)))
        conn.execute(sa.insert(shard_data), puts)


def _writes_to_wire(writes: WriteSet) -> list[list[Any]]:
    return [[key, deleted, value] for key, deleted, value in writes]


def _writes_from_wire(data: Any) -> WriteSet:
    return [(str(k), bool(d), v) for k, d, v in data]


def _resource_to_wire(resource: Any) -> Any:
    return list(resource) if isinstance(resource, tuple) else resource


def _locks_from_wire(data: Any) -> list[tuple[Any, str]]:
    return [((tuple(r) if isinstance(r, list) else r), str(m)) for r, m in data]


class _CommitEntry:
    __slots__ = ("committed_at", "position", "shard", "txid", "writes")

    def __init__(self, shard: str, position: int, txid: int, writes: WriteSet, committed_at: float) -> None:
        self.shard = shard
        self.position = position
        self.txid = txid
        self.writes = writes
        self.committed_at = committed_at


def _write_prepares(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[None]:
    conn.execute(sa.insert(prepared), list(rows))
    return [None] * len(rows)


def _drop_prepares(conn: Connection, records: Sequence[tuple[str, int]]) -> list[None]:
    for shard in {s for s, _ in records}:
        txids = [t for s, t in records if s == shard]
        conn.execute(sa.delete(prepared).where(prepared.c.shard == shard, prepared.c.txid.in_(txids)))
    return [None] * len(records)


def _write_commits(conn: Connection, entries: Sequence[_CommitEntry]) -> list[int]:
    """Every commit of the batch with a handful of statements: the final value of each
    key (later entries win: they hold the lock after earlier ones), the log entries, and
    the prepare records dropped."""
    for shard in sorted({e.shard for e in entries}):
        mine = [e for e in entries if e.shard == shard]
        final: dict[str, tuple[bool, Any]] = {}
        for entry in mine:
            for key, deleted, value in entry.writes:
                final[key] = (deleted, value)
        if final:
            conn.execute(
                sa.delete(shard_data).where(shard_data.c.shard == shard, shard_data.c.key.in_(list(final)))
            )
            puts = [{"shard": shard, "key": k, "value": encode(v)} for k, (d, v) in final.items() if not d]
            if puts:
                conn.execute(sa.insert(shard_data), puts)
        conn.execute(
            sa.insert(commit_log),
            [
                {
                    "shard": shard,
                    "position": e.position,
                    "txid": e.txid,
                    "writes": encode(_writes_to_wire(e.writes)),
                    "committed_at": e.committed_at,
                }
                for e in mine
            ],
        )
        conn.execute(
            sa.delete(prepared).where(prepared.c.shard == shard, prepared.c.txid.in_([e.txid for e in mine]))
        )
    return [e.position for e in entries]


PREPARE_RECORDS: RecordKind[dict[str, Any], None] = RecordKind("prepare", _write_prepares)
DROP_PREPARE_RECORDS: RecordKind[tuple[str, int], None] = RecordKind("drop_prepare", _drop_prepares)
COMMITS: RecordKind[_CommitEntry, int] = RecordKind("commit", _write_commits)
