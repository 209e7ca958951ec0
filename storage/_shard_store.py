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
from collections.abc import Callable, Sequence
from typing import Any

import cbor2
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from ._appender import GroupCommitAppender, RecordKind
from ._database import Database
from ._raw import raw_cursor, raw_executemany, raw_run
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
        self._writes_started = 0
        self._writes_in_flight = 0
        #: txid -> the meta its prepare record was written with (filled by :meth:`open`).
        self.record_meta: dict[int, dict[str, Any]] = {}

    async def open(self) -> list[tuple[int, WriteSet, list[tuple[Any, str]]]]:
        """Load the log position and return the prepare records (recovery input); the
        ``meta`` each was written with (``write_prepare``) is left in :attr:`record_meta`."""
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
            records = []
            for r in rows:
                locks = decode(r.locks)
                if isinstance(locks, dict):
                    meta[int(r.txid)] = {k: v for k, v in locks.items() if k != "locks"}
                records.append((int(r.txid), _writes_from_wire(decode(r.writes)), _prepare_locks_from_wire(locks)))
            return int(top or 0), records

        meta: dict[int, dict[str, Any]] = {}
        top, records = await self.database.read(load)
        self.record_meta = meta
        self.next_position = top + 1
        self._opened = True
        return records

    # --- reads --------------------------------------------------------------------------

    def get_cached(self, key: str) -> tuple[bool, Any] | None:
        """:meth:`get` if the answer is in memory (no wait), else None."""
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
        return cached

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

        started = self._writes_started
        quiet = self._writes_in_flight == 0
        found = await self.database.read(read)
        if quiet and self._writes_started == started:
            # No write was in flight or began during the read: what it read is current.
            # (Otherwise the cache could keep a value older than a write it missed.)
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

    async def is_committed_in(self, low: int, high: int) -> bool:
        """Has any txid in ``low..high`` (inclusive) a commit-log entry here? (The ids of
        one transaction's replicated records form such a range.)"""
        shard = self.shard

        def read(conn: Connection) -> bool:
            row = conn.execute(
                sa.select(commit_log.c.position)
                .where(commit_log.c.shard == shard, commit_log.c.txid.between(low, high))
                .limit(1)
            ).first()
            return row is not None

        return await self.database.read(read)

    # --- durable writes ------------------------------------------------------------------

    async def write_prepare(
        self,
        txid: int,
        writes: WriteSet,
        locks: Sequence[tuple[Any, str]],
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Make the prepare record (write set + locks) durable. ``meta`` (replication:
        ``{"origin": node}``, for inspection) is kept with it."""
        await self.write_prepares([(txid, writes, locks, meta)])

    async def write_prepares(
        self, records: Sequence[tuple[int, WriteSet, Sequence[tuple[Any, str]], dict[str, Any] | None]]
    ) -> None:
        """:meth:`write_prepare` for several ``(txid, writes, locks, meta)`` records at
        once: one queued record for the group commit (one wait, not one per record)."""
        await self.appender.append(PREPARE_RECORDS, self._prepare_rows(records))

    def write_prepares_nowait(
        self,
        records: Sequence[tuple[int, WriteSet, Sequence[tuple[Any, str]], dict[str, Any] | None]],
        done: Callable[[Any, BaseException | None], None],
    ) -> None:
        """:meth:`write_prepares` without waiting: ``done(None, error)`` once durable (error
        None) or failed, from the group commit's task (``GroupCommitAppender.append_nowait``;
        raises what it raises without queueing). Always written: nothing withdraws it."""
        self.appender.append_nowait(PREPARE_RECORDS, self._prepare_rows(records), done)

    def _prepare_rows(
        self, records: Sequence[tuple[int, WriteSet, Sequence[tuple[Any, str]], dict[str, Any] | None]]
    ) -> list[dict[str, Any]]:
        now = time.time()
        rows = []
        for txid, writes, locks, meta in records:
            lock_list = [[_resource_to_wire(r), m] for r, m in locks]
            rows.append(
                {
                    "shard": self.shard,
                    "txid": txid,
                    "writes": encode(_writes_to_wire(writes)),
                    # A plain list (the original format), or a map carrying the replication facts.
                    "locks": encode({"locks": lock_list, **meta} if meta else lock_list),
                    "prepared_at": now,
                }
            )
        return rows

    async def delete_prepare(self, txid: int) -> None:
        await self.appender.append(DROP_PREPARE_RECORDS, (self.shard, txid))

    async def apply_commit(self, txid: int, writes: WriteSet) -> int:
        """Apply ``writes``, append the commit-log entry and drop the prepare record,
        in one local transaction. Returns the entry's log position."""
        (position,) = await self.apply_commits([(txid, writes)])
        return position

    async def apply_commits(self, commits: Sequence[tuple[int, WriteSet]]) -> list[int]:
        """:meth:`apply_commit` for several ``(txid, writes)`` at once, in this order: one
        queued record for the group commit. Returns their log positions."""
        now = time.time()
        entries = []
        for txid, writes in commits:
            # The cache takes the new values now, in log-position order: entries that are
            # written concurrently (one group-commit batch) may finish in any order, and
            # updating the cache as each finishes could leave an older value in it.
            for key, deleted, value in writes:
                self._remember(key, (False, None) if deleted else (True, value))
            entries.append(_CommitEntry(self.shard, self.next_position, txid, writes, now))
            self.next_position += 1
        self._writes_started += 1
        self._writes_in_flight += 1
        try:
            result: list[int] = await self.appender.append(COMMITS, entries)
        except BaseException:
            self._cache.clear()  # the outcome may be unknown: re-read from the database
            raise
        finally:
            self._writes_in_flight -= 1
        return result

    def apply_commits_nowait(
        self, commits: Sequence[tuple[int, WriteSet]], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """:meth:`apply_commits` without waiting: ``done(positions, None)`` once durable, or
        ``done(None, error)``, from the group commit's task (``append_nowait``; raises
        what it raises without queueing)."""
        now = time.time()
        entries = []
        for txid, writes in commits:
            for key, deleted, value in writes:  # (as apply_commits: in log-position order)
                self._remember(key, (False, None) if deleted else (True, value))
            entries.append(_CommitEntry(self.shard, self.next_position, txid, writes, now))
            self.next_position += 1

        def finished(result: Any, exc: BaseException | None) -> None:
            self._writes_in_flight -= 1
            if exc is not None:
                self._cache.clear()  # the outcome may be unknown: re-read from the database
            done(result, exc)

        self._writes_started += 1
        self._writes_in_flight += 1
        try:
            self.appender.append_nowait(COMMITS, entries, finished)
        except BaseException:
            self._writes_in_flight -= 1
            self._cache.clear()
            raise

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

    async def partition_digests(self, partition_of: Any) -> dict[int, tuple[int, str]]:
        """``{partition: (rows, digest)}`` of the committed state, for every partition
        with data here; ``partition_of(key)`` maps a key to its partition. Replicas of a
        partition hold equal digests when they hold the same committed state."""
        shard = self.shard

        def read(conn: Connection) -> dict[int, tuple[int, str]]:
            rows = conn.execute(
                sa.select(shard_data.c.key, shard_data.c.value)
                .where(shard_data.c.shard == shard)
                .order_by(shard_data.c.key)
            )
            hashes: dict[int, Any] = {}
            counts: dict[int, int] = {}
            for row in rows:
                partition = partition_of(row.key)
                h = hashes.get(partition)
                if h is None:
                    h = hashes[partition] = hashlib.blake2b(digest_size=16)
                    counts[partition] = 0
                h.update(encode([row.key, row.value]))
                counts[partition] += 1
            return {p: (counts[p], h.hexdigest()) for p, h in hashes.items()}

        return await self.database.read(read)

    async def partition_rows(
        self, partition_of: Any, partitions: set[int], after: str | None, limit: int
    ) -> list[tuple[str, Any]]:
        """Committed (key, value) rows of ``partitions`` with key > ``after``, in key order,
        at most ``limit`` (a catch-up snapshot page)."""
        shard = self.shard

        def read(conn: Connection) -> list[tuple[str, Any]]:
            query = sa.select(shard_data.c.key, shard_data.c.value).where(shard_data.c.shard == shard)
            if after is not None:
                query = query.where(shard_data.c.key > after)
            out: list[tuple[str, Any]] = []
            for row in conn.execute(query.order_by(shard_data.c.key)):
                if partition_of(row.key) in partitions:
                    out.append((row.key, decode(row.value)))
                    if len(out) >= limit:
                        break
            return out

        return await self.database.read(read)

    async def partition_keys(self, partition_of: Any, partitions: set[int]) -> list[str]:
        """Every key this store holds in ``partitions``."""
        shard = self.shard

        def read(conn: Connection) -> list[str]:
            rows = conn.execute(sa.select(shard_data.c.key).where(shard_data.c.shard == shard))
            return [r.key for r in rows if partition_of(r.key) in partitions]

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


def _prepare_locks_from_wire(data: Any) -> list[tuple[Any, str]]:
    """The lock list of a prepare record: a plain list, or a map with ``locks`` and the
    replication facts (see ``write_prepare``)."""
    return _locks_from_wire(data["locks"] if isinstance(data, dict) else data)


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


# -- batch writers ---------------------------------------------------------------------
#
# These run for every prepare and commit, so their statements are built once, at import,
# with bind parameters and executed executemany-style (one parameter set per row): no
# ``IN (...)`` list whose length changes the SQL, so the compiled-statement cache hits.
# On SQLite they run prebuilt SQL on the driver's cursor (see storage._raw).

_data = shard_data.c
_DELETE_DATA = sa.delete(shard_data).where(
    _data.shard == sa.bindparam("b_shard"), _data.key == sa.bindparam("b_key")
)
_INSERT_DATA = sa.insert(shard_data)
_INSERT_LOG = sa.insert(commit_log)
_INSERT_PREPARED = sa.insert(prepared)
_DELETE_PREPARED = sa.delete(prepared).where(
    prepared.c.shard == sa.bindparam("b_shard"), prepared.c.txid == sa.bindparam("b_txid")
)
# PostgreSQL: one upsert statement instead of a delete and an insert.
_pg_insert_data = postgresql.insert(shard_data)
_PG_UPSERT_DATA = _pg_insert_data.on_conflict_do_update(
    index_elements=[_data.shard, _data.key], set_={"value": _pg_insert_data.excluded.value}
)

_RAW_DELETE_DATA = 'DELETE FROM txrpc_shard_data WHERE shard = ? AND "key" = ?'
_RAW_UPSERT_DATA = (
    'INSERT INTO txrpc_shard_data (shard, "key", value) VALUES (?, ?, ?) '
    'ON CONFLICT (shard, "key") DO UPDATE SET value = excluded.value'
)
_RAW_INSERT_LOG = (
    "INSERT INTO txrpc_commit_log (shard, position, txid, writes, committed_at) VALUES (?, ?, ?, ?, ?)"
)
_RAW_INSERT_PREPARED = (
    "INSERT INTO txrpc_prepared (shard, txid, writes, locks, prepared_at) VALUES (?, ?, ?, ?, ?)"
)
_RAW_DELETE_PREPARED = "DELETE FROM txrpc_prepared WHERE shard = ? AND txid = ?"


def _use_raw_sqlite(conn: Connection) -> bool:
    return conn.dialect.name == "sqlite"


def _write_prepares(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[None]:
    if _use_raw_sqlite(conn):
        raw_executemany(
            conn,
            _RAW_INSERT_PREPARED,
            [(r["shard"], r["txid"], r["writes"], r["locks"], r["prepared_at"]) for r in rows],
        )
    else:
        conn.execute(_INSERT_PREPARED, list(rows))
    return [None] * len(rows)


def _drop_prepares(conn: Connection, records: Sequence[tuple[str, int]]) -> list[None]:
    if _use_raw_sqlite(conn):
        raw_executemany(conn, _RAW_DELETE_PREPARED, list(records))
    else:
        conn.execute(_DELETE_PREPARED, [{"b_shard": s, "b_txid": t} for s, t in records])
    return [None] * len(records)


def _write_commits(conn: Connection, entries: Sequence[_CommitEntry]) -> list[int]:
    """Every commit of the batch with a handful of statements: the final value of each
    key (later entries win: they hold the lock after earlier ones), the log entries, and
    the prepare records dropped."""
    final: dict[tuple[str, str], tuple[bool, Any]] = {}
    for entry in entries:
        shard = entry.shard
        for key, deleted, value in entry.writes:
            final[(shard, key)] = (deleted, value)
    deletes = [pk for pk, (deleted, _) in final.items() if deleted]
    puts = [(shard, key, encode(value)) for (shard, key), (deleted, value) in final.items() if not deleted]
    log_rows = [
        (e.shard, e.position, e.txid, encode(_writes_to_wire(e.writes)), e.committed_at) for e in entries
    ]
    dropped = [(e.shard, e.txid) for e in entries]
    if _use_raw_sqlite(conn):
        cursor = raw_cursor(conn)
        try:
            if deletes:
                raw_run(cursor, _RAW_DELETE_DATA, deletes)
            if puts:
                raw_run(cursor, _RAW_UPSERT_DATA, puts)
            raw_run(cursor, _RAW_INSERT_LOG, log_rows)
            raw_run(cursor, _RAW_DELETE_PREPARED, dropped)
        finally:
            cursor.close()
        return [e.position for e in entries]
    if deletes:
        conn.execute(_DELETE_DATA, [{"b_shard": s, "b_key": k} for s, k in deletes])
    if puts:
        put_rows = [{"shard": s, "key": k, "value": v} for s, k, v in puts]
        if conn.dialect.name == "postgresql":
            conn.execute(_PG_UPSERT_DATA, put_rows)
        else:
            conn.execute(_DELETE_DATA, [{"b_shard": s, "b_key": k} for s, k, _ in puts])
            conn.execute(_INSERT_DATA, put_rows)
    conn.execute(
        _INSERT_LOG,
        [
            {"shard": s, "position": p, "txid": t, "writes": w, "committed_at": c}
            for s, p, t, w, c in log_rows
        ],
    )
    conn.execute(_DELETE_PREPARED, [{"b_shard": s, "b_txid": t} for s, t in dropped])
    return [e.position for e in entries]


def _write_prepare_groups(conn: Connection, groups: Sequence[list[dict[str, Any]]]) -> list[None]:
    _write_prepares(conn, [row for group in groups for row in group])
    return [None] * len(groups)


def _write_commit_groups(conn: Connection, groups: Sequence[list[_CommitEntry]]) -> list[list[int]]:
    positions = iter(_write_commits(conn, [entry for group in groups for entry in group]))
    return [[next(positions) for _ in group] for group in groups]


# A queued record is a list of rows: one transaction's, or a follower's batch of them (one
# wait for all).
PREPARE_RECORDS: RecordKind[list[dict[str, Any]], None] = RecordKind("prepare", _write_prepare_groups)
DROP_PREPARE_RECORDS: RecordKind[tuple[str, int], None] = RecordKind("drop_prepare", _drop_prepares)
COMMITS: RecordKind[list[_CommitEntry], list[int]] = RecordKind("commit", _write_commit_groups)
