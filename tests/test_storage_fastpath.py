"""The storage write paths built for CPU (prebuilt statements, executemany, upserts, the
SQLite driver-cursor path): same rows as the straightforward SQLAlchemy path, on
SQLite and PostgreSQL, batched and not, with failures failing the batch as before."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
import sqlalchemy as sa
import trio

import storage
from storage import _shard_store
from storage._txn_schema import commit_log, prepared, shard_data


def _rows(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return {
                "data": sorted(
                    (r.shard, r.key, _shard_store.decode(r.value)) for r in conn.execute(sa.select(shard_data))
                ),
                "log": sorted(
                    (r.shard, int(r.position), int(r.txid), _shard_store.decode(r.writes), float(r.committed_at))
                    for r in conn.execute(sa.select(commit_log))
                ),
                "prepared": sorted(
                    (r.shard, int(r.txid), _shard_store.decode(r.writes), _shard_store.decode(r.locks))
                    for r in conn.execute(sa.select(prepared))
                ),
            }
    finally:
        engine.dispose()


def _workload(seed: int, shards: Sequence[str], n: int) -> list[tuple[str, int, _shard_store.WriteSet, bool]]:
    """(shard, txid, writes, commit?) steps over a small key space: overwrites, deletes of
    present and absent keys, several writes of one key in one write set."""
    rng = random.Random(seed)
    steps = []
    for txid in range(1, n + 1):
        writes: _shard_store.WriteSet = []
        for _ in range(rng.randint(0, 4)):
            key = f"k{rng.randint(0, 9)}"
            if rng.random() < 0.3:
                writes.append((key, True, None))
            else:
                writes.append((key, False, {"txid": txid, "blob": b"x" * rng.randint(0, 3)}))
        steps.append((rng.choice(shards), txid, writes, rng.random() < 0.85))
    return steps


async def _run(url: str, steps: list[tuple[str, int, _shard_store.WriteSet, bool]], concurrent: bool) -> None:
    async with storage.open_storage(url) as st:
        stores = {}
        for shard in sorted({s for s, *_ in steps}):
            stores[shard] = storage.ShardStore(st.database, st.appender, shard)
            await stores[shard].open()
        # One writer per shard (the participant is its shard's only writer and commits
        # in lock order); shards run concurrently so their records share batches.
        by_shard: dict[str, list[tuple[int, _shard_store.WriteSet, bool]]] = {}
        for shard, txid, writes, commit in steps:
            by_shard.setdefault(shard, []).append((txid, writes, commit))

        async def drive(shard: str) -> None:
            store = stores[shard]
            for txid, writes, commit in by_shard[shard]:
                await store.write_prepare(txid, writes, [(("acct", txid), "w"), ("plain", "r")])
                if commit:
                    await store.apply_commit(txid, writes)
                elif txid % 2:
                    await store.delete_prepare(txid)

        if concurrent:
            async with trio.open_nursery() as nursery:
                for shard in by_shard:
                    nursery.start_soon(drive, shard)
        else:
            for shard in by_shard:
                await drive(shard)
        for shard, store in stores.items():
            expected: dict[str, Any] = {}
            for _txid, writes, commit in by_shard[shard]:
                if commit:
                    for key, deleted, value in writes:
                        if deleted:
                            expected.pop(key, None)
                        else:
                            expected[key] = value
            assert await store.items() == expected
            store._cache.clear()
            for key in (f"k{i}" for i in range(10)):
                assert await store.get(key) == ((True, expected[key]) if key in expected else (False, None))


def _normalized(rows: dict[str, Any]) -> dict[str, Any]:
    # committed_at / prepared_at are wall-clock: compare everything else.
    return {
        "data": rows["data"],
        "log": [r[:4] for r in rows["log"]],
        "prepared": rows["prepared"],
    }


@pytest.mark.parametrize("concurrent", [False, True])
async def test_shard_store_writes_match_the_plain_sqlalchemy_path(
    db_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, concurrent: bool
) -> None:
    steps = _workload(7, ["s1", "s2", "s3"], 120)
    await _run(db_url, steps, concurrent)
    fast = _normalized(_rows(db_url))

    # The same workload through the dialect-neutral SQLAlchemy statements on a second
    # SQLite database (the driver-cursor path switched off).
    reference = f"sqlite:///{tmp_path / 'reference.db'}"
    monkeypatch.setattr(_shard_store, "_use_raw_sqlite", lambda conn: False)
    await _run(reference, steps, concurrent)
    monkeypatch.undo()
    assert fast == _normalized(_rows(reference))
    assert fast["log"] and fast["data"] and fast["prepared"]
    # Positions are dense per shard.
    for shard in ("s1", "s2", "s3"):
        positions = [r[1] for r in fast["log"] if r[0] == shard]
        assert positions == list(range(1, len(positions) + 1))


async def test_a_duplicate_prepare_fails_its_batch_with_sqlalchemys_integrity_error(db_url: str) -> None:
    async with storage.open_storage(db_url) as st:
        store = storage.ShardStore(st.database, st.appender, "s1")
        await store.open()
        await store.write_prepare(1, [("a", False, 1)], [])
        with pytest.raises(storage.BatchFailed) as caught:
            await store.write_prepare(1, [("a", False, 2)], [])
        assert isinstance(caught.value.__cause__, sa.exc.IntegrityError)
        assert not caught.value.outcome_unknown
        # The appender keeps working after the failed batch.
        assert await store.apply_commit(1, [("a", False, 3)]) == 1
        assert await store.get("a") == (True, 3)
    assert _rows(db_url)["prepared"] == []


async def test_coordinator_decisions_and_done_marks(db_url: str) -> None:
    async with storage.open_storage(db_url) as st:
        log = storage.CoordinatorLog(st.database, st.appender, "c1")
        other = storage.CoordinatorLog(st.database, st.appender, "c2")
        async with trio.open_nursery() as nursery:
            for txid in range(1, 41):
                nursery.start_soon(log.write_decision, txid, "commit", ("a", "b"))
            nursery.start_soon(other.write_decision, 1, "commit", ("z",))
        async with trio.open_nursery() as nursery:
            for txid in range(1, 41, 2):
                nursery.start_soon(log.mark_done, txid, {"b", "a"})
        with pytest.raises(storage.BatchFailed) as caught:
            await log.write_decision(5, "commit", ("a",))
        assert isinstance(caught.value.__cause__, sa.exc.IntegrityError)
        _end, undone = await log.load()
        assert [txid for txid, _, _ in undone] == list(range(2, 41, 2))
        assert all(participants == ("a", "b") and acked == set() for _, participants, acked in undone)
        done = await log.get(3)
        assert done is not None and done["done"] and done["acked"] == ["a", "b"] and not done["heuristic"]
        assert done["outcome"] == "commit" and done["participants"] == ["a", "b"] and done["reason"] == ""
        fresh = await log.get(4)
        assert fresh is not None and not fresh["done"] and fresh["acked"] == []
        assert (await other.load())[1] == [(1, ("z",), set())]


# -- the appender's writer connection (SQLite) ------------------------------------------


def _sync_mode(conn: sa.Connection, records: Sequence[str]) -> list[int]:
    """A batch writer returning the writing connection's ``synchronous`` (1 NORMAL, 2 FULL)."""
    mode = int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
    return [mode] * len(records)


DURABLE_PROBE: storage.RecordKind[str, int] = storage.RecordKind("test.durable_probe", _sync_mode)
LAZY_PROBE: storage.RecordKind[str, int] = storage.RecordKind("test.lazy_probe", _sync_mode, durable=False)


def _fail(conn: sa.Connection, records: Sequence[str]) -> list[None]:
    raise RuntimeError("poisoned batch")


LAZY_FAILURE: storage.RecordKind[str, None] = storage.RecordKind("test.lazy_failure", _fail, durable=False)


def _pooled_modes(engine: sa.Engine) -> list[int]:
    """``synchronous`` of every connection idle in the pool."""
    conns = [engine.connect() for _ in range(engine.pool.checkedin())]  # type: ignore[attr-defined]
    try:
        return [int(c.exec_driver_sql("PRAGMA synchronous").scalar_one()) for c in conns]
    finally:
        for c in conns:
            c.close()


@pytest.mark.parametrize("pipelined", [False, True])
async def test_each_batch_commits_in_its_durability_mode_and_pooled_connections_stay_full(
    sqlite_url: str, pipelined: bool
) -> None:
    engine = storage.open_engine(sqlite_url)
    database = storage.Database(engine)
    try:
        async with storage.open_appender(database, pipelined_fsync=pipelined) as appender:
            # Alternating kinds, one record per batch: the mode is switched both ways.
            for kind in [DURABLE_PROBE, LAZY_PROBE, LAZY_PROBE, DURABLE_PROBE, DURABLE_PROBE, LAZY_PROBE]:
                mode = await appender.append(kind, "x")
                expected = 1 if pipelined or not kind.durable else 2
                assert mode == expected, (kind, mode)
                assert all(m == 2 for m in _pooled_modes(engine))
            # Readers never get the writer's connection.
            modes = await database.read(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar_one())
            assert modes == 2
            # A failed batch gives the connection back (restored) and the next one works.
            assert await appender.append(LAZY_PROBE, "y") == 1
            with pytest.raises(storage.BatchFailed):
                await appender.append(LAZY_FAILURE, "z")
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            assert all(m == 2 for m in _pooled_modes(engine))
            assert await appender.append(DURABLE_PROBE, "w") == (1 if pipelined else 2)
            assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
        # Stopped: the writer connection is back in the pool, at FULL.
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert _pooled_modes(engine) and all(m == 2 for m in _pooled_modes(engine))
    finally:
        database.close()


async def test_a_cancelled_appender_gives_its_writer_connection_back(sqlite_url: str) -> None:
    engine = storage.open_engine(sqlite_url)
    database = storage.Database(engine)
    try:
        with trio.CancelScope() as scope:
            async with storage.open_appender(database, pipelined_fsync=True) as appender:
                await appender.append(LAZY_PROBE, "x")
                assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]
                scope.cancel()
                await trio.sleep_forever()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert all(m == 2 for m in _pooled_modes(engine))
    finally:
        database.close()


async def test_a_locked_database_fails_the_batch_at_begin_and_the_writer_recovers(sqlite_url: str) -> None:
    engine = storage.open_engine(sqlite_url, busy_timeout_s=0.05)
    database = storage.Database(engine)
    try:
        async with storage.open_appender(database) as appender:
            assert await appender.append(DURABLE_PROBE, "x") == 2  # the writer connection is open
            with engine.connect() as holder:
                holder.execution_options(txrpc_write=True)
                with holder.begin():
                    with pytest.raises(storage.BatchFailed) as caught:
                        await appender.append(DURABLE_PROBE, "y")
            assert isinstance(caught.value.__cause__, sa.exc.OperationalError)
            assert "locked" in str(caught.value) and not caught.value.outcome_unknown
            assert await appender.append(DURABLE_PROBE, "z") == 2
            assert await appender.append(LAZY_PROBE, "z") == 1
    finally:
        database.close()
