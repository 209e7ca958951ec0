"""The request log and the key-value store on real SQLite files and real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import pytest
import sqlalchemy as sa
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import storage
from storage import _schema
from txrpc import _idempotency as idem

FP = idem.fingerprint("bank.withdraw", ["alice", 10], {})
OTHER_FP = idem.fingerprint("bank.withdraw", ["alice", 11], {})
LEASE_S = 10.0


@asynccontextmanager
async def opened(db_url: str, **options: Any) -> AsyncIterator[storage.Storage]:
    async with storage.open_storage(db_url, **options) as st:
        yield st


def committed(db_url: str, fn: Callable[[sa.Connection], Any]) -> Any:
    """Read through a fresh engine: only what is committed is visible."""
    engine = storage.open_engine(db_url, create=False, read_only=True)
    try:
        with engine.connect() as conn:
            return fn(conn)
    finally:
        engine.dispose()


def row(db_url: str, identity: str = "alice", key: str = "k1") -> storage.RequestRecord | None:
    return committed(db_url, lambda conn: storage.get_request(conn, identity, key))  # type: ignore[no-any-return]


def kv(db_url: str, namespace: str = "bank") -> dict[str, Any]:
    return committed(db_url, lambda conn: storage.kv_items(conn, namespace))  # type: ignore[no-any-return]


async def test_begin_inserts_once_then_returns_the_row(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        first = await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=100.0)
        assert first.new
        assert first.record.state is storage.RequestState.IN_PROGRESS
        assert (first.record.attempt, first.record.created_at, first.record.lease_expires_at) == (
            1,
            100.0,
            110.0,
        )
        second = await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=104.0)
        assert not second.new
        assert second.record == first.record  # untouched by the second begin
        assert idem.decide(second.record, FP, now=104.0) == idem.InProgress(attempt=1, retry_after_s=6.0)
    assert row(db_url) == first.record  # durable: a fresh engine sees it


async def test_completed_response_is_replayed(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=100.0)
        done = await log.complete("alice", "k1", 1, now=101.5, response=cbor2.dumps({"balance": 90}))
        assert done.completed and done.completed_at == 101.5 and done.error is None
        again = await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=200.0)
        assert not again.new
        decision = idem.decide(again.record, FP, now=200.0)
        assert isinstance(decision, idem.Replay)
        assert decision.record.response is not None
        assert cbor2.loads(decision.record.response) == {"balance": 90}
        assert await log.note_replay("alice", "k1", now=200.0)
        assert await log.note_replay("alice", "k1", now=201.0)
        assert (await log.stats()).replays == 2
    record = row(db_url)
    assert record is not None and record.replay_count == 2 and record.last_replayed_at == 201.0


async def test_error_outcomes_are_stored_and_replayed(db_url: str) -> None:
    error = storage.StoredError(10, "insufficient funds", cbor2.dumps({"balance": 3}))
    async with opened(db_url) as st:
        log = st.request_log
        await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=100.0)
        await log.complete("alice", "k1", 1, now=100.2, error=error)
        existing = (await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=300.0)).record
    decision = idem.decide(existing, FP, now=300.0)
    assert isinstance(decision, idem.Replay)
    assert existing.error == error and existing.response is None
    assert row(db_url) == existing


async def test_same_key_different_payload_is_a_mismatch_and_changes_nothing(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=100.0)
        in_progress = await log.begin("alice", "k1", "bank.withdraw", OTHER_FP, LEASE_S, now=101.0)
        assert idem.decide(in_progress.record, OTHER_FP, now=101.0, method="bank.withdraw") == idem.Mismatch(
            stored_method="bank.withdraw", method="bank.withdraw"
        )
        await log.complete("alice", "k1", 1, now=102.0, response=b"\xf6")
        completed = await log.begin("alice", "k1", "bank.deposit", OTHER_FP, LEASE_S, now=103.0)
        assert isinstance(idem.decide(completed.record, OTHER_FP, now=103.0), idem.Mismatch)
    record = row(db_url)
    assert record is not None and record.fingerprint == FP and record.response == b"\xf6"


async def test_concurrent_begins_have_exactly_one_winner(db_url: str) -> None:
    wins: list[int] = []

    async def begin(st: storage.Storage, n: int) -> None:
        result = await st.request_log.begin("alice", "k1", "m", FP, LEASE_S, now=100.0 + n)
        if result.new:
            wins.append(n)

    # Two independent storages = two engines, two connection pools: a real race in the database.
    async with opened(db_url) as one, opened(db_url) as two:
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(begin, one if n % 2 else two, n)
    assert len(wins) == 1
    record = row(db_url)
    assert record is not None and record.created_at == 100.0 + wins[0]


async def test_expired_lease_is_taken_over_by_exactly_one_of_many_takers(db_url: str) -> None:
    async with opened(db_url) as one, opened(db_url) as two:
        await one.request_log.begin("alice", "k1", "m", FP, LEASE_S, now=100.0)
        existing = await one.request_log.get("alice", "k1")
        assert existing is not None
        assert isinstance(idem.decide(existing, FP, now=109.9), idem.InProgress)
        # The storage guard agrees: a live lease cannot be taken over.
        assert await two.request_log.take_over("alice", "k1", 1, LEASE_S, now=109.9) is None

        decision = idem.decide(existing, FP, now=110.0)
        assert decision == idem.TakeOver(attempt_seen=1)
        winners: list[storage.RequestRecord] = []

        async def take(st: storage.Storage, n: int) -> None:
            won = await st.request_log.take_over("alice", "k1", decision.attempt_seen, LEASE_S, now=110.0 + n)
            if won is not None:
                winners.append(won)

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(take, one if n % 2 else two, n)
        assert len(winners) == 1
        taken = winners[0]
        assert taken.attempt == 2 and taken.lease_expires_at > 110.0

        # The deposed executor cannot complete; the new one can.
        with pytest.raises(storage.LeaseLost, match="attempt 1 is not current: attempt 2 took it over"):
            await one.request_log.complete("alice", "k1", 1, now=121.0, response=b"\x01")
        done = await two.request_log.complete("alice", "k1", 2, now=121.0, response=b"\x02")
        assert done.response == b"\x02"
        with pytest.raises(storage.LeaseLost, match="already completed"):
            await one.request_log.complete("alice", "k1", 2, now=122.0, response=b"\x03")
    record = row(db_url)
    assert record is not None and record.attempt == 2 and record.response == b"\x02"


async def test_renew_and_release_act_only_for_the_current_attempt(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        await log.begin("alice", "k1", "m", FP, LEASE_S, now=100.0)
        assert await log.renew_lease("alice", "k1", 1, LEASE_S, now=108.0)
        assert await log.take_over("alice", "k1", 1, LEASE_S, now=110.0) is None  # renewed until 118
        assert not await log.renew_lease("alice", "k1", 7, LEASE_S, now=109.0)
        assert not await log.release("alice", "k1", 2)
        assert await log.release("alice", "k1", 1)
        assert await log.get("alice", "k1") is None
        assert (await log.begin("alice", "k1", "m", FP, LEASE_S, now=111.0)).new  # a retry runs afresh


async def test_keys_are_scoped_per_identity(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        assert (await log.begin("alice", "shared-key", "m", FP, LEASE_S, now=100.0)).new
        await log.complete("alice", "shared-key", 1, now=100.5, response=b"\x01")
        bob = await log.begin("bob", "shared-key", "m", OTHER_FP, LEASE_S, now=101.0)
        assert bob.new and bob.record.fingerprint == OTHER_FP  # no mismatch across identities
        assert (await log.get("alice", "shared-key")).response == b"\x01"  # type: ignore[union-attr]
    rows = committed(db_url, lambda conn: storage.find_requests(conn, "shared-key"))
    assert [(r.identity, r.state.value) for r in rows] == [("alice", "completed"), ("bob", "in_progress")]


async def test_list_and_stats(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        for n, (identity, method) in enumerate(
            [
                ("alice", "bank.withdraw"),
                ("alice", "bank.deposit"),
                ("bob", "bank.withdraw"),
                ("bob", "calc.add"),
            ]
        ):
            await log.begin(identity, f"k{n}", method, FP, LEASE_S, now=100.0 + n)
        await log.complete("alice", "k0", 1, now=105.0, response=b"\x01")
        await log.complete("bob", "k2", 1, now=106.0, error=storage.StoredError(9, "no", b"\xa0"))

        assert [r.key for r in await log.list()] == ["k3", "k2", "k1", "k0"]  # newest first
        assert [r.key for r in await log.list(state="in_progress")] == ["k3", "k1"]
        assert [r.key for r in await log.list(method="bank.withdraw")] == ["k2", "k0"]
        assert [r.key for r in await log.list(identity="bob", state=storage.RequestState.COMPLETED)] == ["k2"]
        assert [r.key for r in await log.list(since=102.0)] == ["k3", "k2"]
        assert [r.key for r in await log.list(limit=1)] == ["k3"]
        with pytest.raises(ValueError):
            await log.list(limit=0)

        stats = await log.stats(now=112.0)  # k1's lease (101+10) has ended, k3's (103+10) has not
        assert (stats.total, stats.in_progress, stats.completed, stats.errors) == (4, 2, 2, 1)
        assert stats.leases_expired == 1
        assert (stats.oldest_created_at, stats.newest_created_at) == (100.0, 103.0)
        assert stats.by_method == (("bank.withdraw", 2), ("bank.deposit", 1), ("calc.add", 1))


async def test_prune_removes_expired_rows_only(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        await log.begin("a", "old-done", "m", FP, LEASE_S, now=0.0)
        await log.complete("a", "old-done", 1, now=5.0, response=b"\x01")
        await log.begin("a", "new-done", "m", FP, LEASE_S, now=0.0)
        await log.complete("a", "new-done", 1, now=500.0, response=b"\x01")
        await log.begin("a", "abandoned", "m", FP, LEASE_S, now=0.0)  # lease ended at 10
        await log.begin("a", "running", "m", FP, LEASE_S, now=495.0)  # lease ends at 505
        cutoff = 100.0
        assert committed(db_url, lambda conn: storage.prune_requests(conn, cutoff, dry_run=True)) == 2
        assert await log.prune(older_than=cutoff) == 2
        assert sorted(r.key for r in await log.list()) == ["new-done", "running"]
        assert await log.prune(older_than=cutoff) == 0
        # A pruned key is forgotten: a retry runs as a new request.
        assert (await log.begin("a", "old-done", "m", FP, LEASE_S, now=600.0)).new


async def test_completion_survives_a_restart(db_url: str) -> None:
    async with opened(db_url) as st:
        await st.request_log.begin("alice", "k1", "m", FP, LEASE_S, now=1.0)
        await st.request_log.complete("alice", "k1", 1, now=2.0, response=b"\x18\x2a")
    async with opened(db_url, create=False) as st:
        record = await st.request_log.get("alice", "k1")
        assert record is not None and record.completed and record.response == b"\x18\x2a"
        assert isinstance(idem.decide(record, FP, now=3.0), idem.Replay)


async def test_begin_and_run_runs_once_per_key_within_a_batch(sqlite_url: str) -> None:
    """Records of one batch for one key, as if they came one by one: the first runs and
    is recorded completed (never in progress); the second sees that row and runs nothing;
    a transient outcome records nothing; on a worker thread it begins instead."""
    async with opened(sqlite_url) as st:
        log = st.request_log
        assert log.runs_inline
        await log.begin("alice", "warm", "bank.withdraw", FP, LEASE_S, now=99.0)  # opens the writer
        runs: list[str] = []

        def run(name: str, outcome: storage.Outcome) -> Callable[[], storage.Outcome]:
            def go() -> storage.Outcome:
                runs.append(name)
                return outcome

            return go

        ok = storage.Outcome(response=cbor2.dumps(9), value="nine")
        results: dict[str, Any] = {}

        async def one(name: str, key: str, outcome: storage.Outcome) -> None:
            results[name] = await log.begin_and_run(
                "alice", key, "bank.withdraw", FP, LEASE_S, 100.0, run(name, outcome)
            )

        async with st.database.write_lock:  # all three queue into one batch
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "first", "k1", ok)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(one, "second", "k1", ok)
                nursery.start_soon(one, "transient", "k2", storage.Outcome(record=False, value="later"))
                await trio.testing.wait_all_tasks_blocked()
                assert st.appender.queued == 3
                st.database.write_lock.release()
                try:
                    await trio.sleep(0.3)
                finally:
                    await st.database.write_lock.acquire()
        assert sorted(runs) == ["first", "transient"]
        first, second = results["first"], results["second"]
        assert isinstance(first, storage.RanResult) and first.recorded and first.outcome.value == "nine"
        assert isinstance(second, storage.BeginResult) and not second.new
        assert second.record.completed and second.record.response == cbor2.dumps(9)
        transient = results["transient"]
        assert isinstance(transient, storage.RanResult) and not transient.recorded
        stored = row(sqlite_url, key="k1")
        assert stored is not None and stored.completed and stored.attempt == 1
        assert row(sqlite_url, key="k2") is None
        st.appender._inline_paused_until = float("inf")  # batches on a worker thread: begin
        on_thread = await log.begin_and_run("alice", "k3", "bank.withdraw", FP, LEASE_S, 101.0, run("k3", ok))
        assert isinstance(on_thread, storage.BeginResult) and on_thread.new
        assert on_thread.record.state is storage.RequestState.IN_PROGRESS and "k3" not in runs


def test_complete_needs_exactly_one_outcome() -> None:
    async def main(db_url: str) -> None:
        async with opened(db_url) as st:
            with pytest.raises(ValueError, match="exactly one"):
                await st.request_log.complete("a", "k", 1, now=1.0)
            with pytest.raises(ValueError, match="exactly one"):
                await st.request_log.complete(
                    "a", "k", 1, now=1.0, response=b"\x01", error=storage.StoredError(1, "", b"")
                )

    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        trio.run(main, directory)


# -- the handler's writes commit with the completion record --------------------------


async def test_extra_writes_commit_with_the_completion(db_url: str) -> None:
    async with opened(db_url) as st:
        await st.request_log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=1.0)
        tx = st.kv_transaction("bank")
        balance = await tx.get("alice", default=100)
        tx.put("alice", balance - 10)
        tx.put("audit", ["withdraw", 10])
        await st.request_log.complete(
            "alice", "k1", 1, now=2.0, response=cbor2.dumps(90), extra_writes=tx.apply
        )
    assert kv(db_url) == {"alice": 90, "audit": ["withdraw", 10]}
    assert row(db_url).completed  # type: ignore[union-attr]


async def test_failing_extra_writes_leave_no_completion(db_url: str) -> None:
    async with opened(db_url) as st:
        await st.request_log.begin("alice", "k1", "m", FP, LEASE_S, now=1.0)
        tx = st.kv_transaction("bank")
        tx.put("alice", 1)

        def writes_then_fails(conn: sa.Connection) -> None:
            tx.apply(conn)  # the kv write happens ...
            raise KeyError("handler's store write failed")  # ... then the store write fails

        with pytest.raises(KeyError, match="store write failed"):
            await st.request_log.complete(
                "alice", "k1", 1, now=2.0, response=b"\x01", extra_writes=writes_then_fails
            )
        # Neither the completion nor the kv write is visible; the attempt can still complete.
        record = row(db_url)
        assert record is not None and record.state is storage.RequestState.IN_PROGRESS and record.attempt == 1
        assert kv(db_url) == {}
        await st.request_log.complete("alice", "k1", 1, now=3.0, response=b"\x02", extra_writes=tx.apply)
    assert kv(db_url) == {"alice": 1}


async def test_lost_lease_discards_the_extra_writes(db_url: str) -> None:
    ran: list[bool] = []
    async with opened(db_url) as st:
        await st.request_log.begin("alice", "k1", "m", FP, LEASE_S, now=0.0)
        assert await st.request_log.take_over("alice", "k1", 1, LEASE_S, now=50.0) is not None
        tx = st.kv_transaction("bank")
        tx.put("alice", "stale attempt's effect")

        def apply(conn: sa.Connection) -> None:
            ran.append(True)
            tx.apply(conn)

        with pytest.raises(storage.LeaseLost):
            await st.request_log.complete("alice", "k1", 1, now=51.0, response=b"\x01", extra_writes=apply)
    assert ran == [] and kv(db_url) == {}
    record = row(db_url)
    assert record is not None and record.attempt == 2 and not record.completed


async def test_a_failed_batch_rolls_back_extra_writes_and_completion(db_url: str) -> None:
    def poison(conn: sa.Connection, records: Any) -> list[Any]:
        raise RuntimeError("disk on fire")

    poison_kind: storage.RecordKind[str, None] = storage.RecordKind("test.poison", poison)
    failures: list[BaseException] = []
    async with opened(db_url) as st:
        await st.request_log.begin("alice", "k1", "m", FP, LEASE_S, now=0.0)
        tx = st.kv_transaction("bank")
        tx.put("alice", 5)

        async def complete() -> None:
            try:
                await st.request_log.complete(
                    "alice", "k1", 1, now=1.0, response=b"\x05", extra_writes=tx.apply
                )
            except storage.BatchFailed as exc:
                failures.append(exc)

        async def poisoned() -> None:
            try:
                await st.appender.append(poison_kind, "x")
            except storage.BatchFailed as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            async with st.database.write_lock:  # both records queue, then go in one batch
                nursery.start_soon(complete)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(poisoned)
                await trio.testing.wait_all_tasks_blocked()
    assert len(failures) == 2
    assert kv(db_url) == {}
    assert not row(db_url).completed  # type: ignore[union-attr]


async def test_kv_transactions_are_optimistic_and_serializable(db_url: str) -> None:
    async with opened(db_url) as st:
        seed = st.kv_transaction("bank")
        seed.put("counter", 0)
        await seed.commit(st.appender)

        first, second = st.kv_transaction("bank"), st.kv_transaction("bank")
        for tx in (first, second):  # both read 0 ...
            tx.put("counter", await tx.get("counter") + 1)  # ... and write 1
        await first.commit(st.appender)
        with pytest.raises(storage.WriteConflict, match="'counter'"):
            await second.commit(st.appender)  # a lost update is refused

        # A read-only dependency is checked too: write skew is refused.
        reader = st.kv_transaction("bank")
        assert await reader.get("counter") == 1
        assert await reader.get("missing", default="absent") == "absent"
        reader.put("copy", "counter was 1")
        bump = st.kv_transaction("bank")
        bump.put("counter", 2)  # a blind write: last writer wins
        await bump.commit(st.appender)
        with pytest.raises(storage.WriteConflict):
            await reader.commit(st.appender)

        # Reads see the transaction's own writes; delete removes the key.
        tx = st.kv_transaction("bank")
        tx.put("temp", {"a": [1, 2]})
        assert await tx.get("temp") == {"a": [1, 2]}
        tx.delete("counter")
        assert await tx.get("counter", default=None) is None
        await tx.commit(st.appender)
        with pytest.raises(TypeError, match="CBOR"):
            tx.put("bad", object())
    assert kv(db_url) == {"temp": {"a": [1, 2]}}


async def test_a_conflicting_handler_can_rerun_and_complete(db_url: str) -> None:
    async with opened(db_url) as st:
        log = st.request_log
        seed = st.kv_transaction("bank")
        seed.put("alice", 100)
        await seed.commit(st.appender)
        await log.begin("alice", "k1", "bank.withdraw", FP, LEASE_S, now=0.0)

        async def withdraw(amount: int) -> tuple[storage.KvTransaction, int]:
            tx = st.kv_transaction("bank")
            balance = await tx.get("alice")
            tx.put("alice", balance - amount)
            return tx, balance - amount

        tx, result = await withdraw(10)
        concurrent = st.kv_transaction("bank")  # another request commits in between
        concurrent.put("alice", await concurrent.get("alice") + 50)
        await concurrent.commit(st.appender)
        with pytest.raises(storage.WriteConflict):
            await log.complete("alice", "k1", 1, now=1.0, response=cbor2.dumps(result), extra_writes=tx.apply)
        tx, result = await withdraw(10)  # re-run on fresh reads, same attempt
        await log.complete("alice", "k1", 1, now=2.0, response=cbor2.dumps(result), extra_writes=tx.apply)
    assert kv(db_url) == {"alice": 140}
    assert cbor2.loads(row(db_url).response) == 140  # type: ignore[arg-type, union-attr]


# -- the log against a model: sequences of operations, some sharing one batch -------

attempts = st.sampled_from([1, 1, 1, 2, 2, 3])  # mostly the attempts that exist
RUN_OUTCOMES = ("plain", "extra", "extra_fails", "transient")
operation = st.one_of(
    st.tuples(st.just("begin"), st.sampled_from([FP, FP, OTHER_FP])),
    st.tuples(st.just("complete"), attempts, st.sampled_from(["plain", "extra", "extra_fails"])),
    st.tuples(st.just("take_over"), attempts),
    st.tuples(st.just("release"), attempts),
    st.tuples(st.just("renew"), attempts),
    st.tuples(st.just("begin_run"), st.sampled_from([FP, OTHER_FP]), st.sampled_from(RUN_OUTCOMES)),
)
rounds = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=8.0), st.lists(operation, min_size=1, max_size=4)),
    min_size=1,
    max_size=6,
)


class Model:
    """The request log's specification for one key, applied one operation at a time."""

    lease_s = 5.0

    def __init__(self) -> None:
        self.row: dict[str, Any] | None = None
        self.kv: dict[str, Any] = {}

    def apply(self, op: tuple[Any, ...], now: float) -> Any:
        row = self.row
        live = row is not None and row["state"] == "in_progress"
        if op[0] == "begin":
            if row is None:
                self.row = {"fp": op[1], "state": "in_progress", "attempt": 1, "lease": now + self.lease_s}
                return ("new", 1)
            return ("existing", row["attempt"], row["state"])
        if op[0] == "begin_run":  # a new key is run and recorded completed in one write
            if row is not None:
                return ("existing", row["attempt"], row["state"])
            if op[2] == "transient":
                return ("ran", False)
            if op[2] == "extra_fails":
                return ("extra_failed",)
            self.row = {"fp": op[1], "state": "completed", "attempt": 1, "lease": now}
            if op[2] == "extra":
                self.kv["done_by"] = "run"
            return ("ran", True)
        attempt = op[1]
        current = live and row is not None and row["attempt"] == attempt
        if op[0] == "take_over":
            if current and row is not None and row["lease"] <= now:
                row["attempt"] += 1
                row["lease"] = now + self.lease_s
                return ("won", row["attempt"])
            return ("lost",)
        if op[0] == "renew":
            if current and row is not None:
                row["lease"] = now + self.lease_s
            return current
        if op[0] == "release":
            if current:
                self.row = None
            return current
        assert op[0] == "complete"
        if not current or row is None:
            return ("lease_lost",)
        if op[2] == "extra_fails":
            return ("extra_failed",)
        row["state"] = "completed"
        if op[2] == "extra":
            self.kv["done_by"] = attempt
        return ("completed", attempt)


async def _run(st_: storage.Storage, op: tuple[Any, ...], now: float, identity: str) -> Any:
    log_ = st_.request_log
    lease_s = Model.lease_s
    if op[0] == "begin":
        result = await log_.begin(identity, "k", "m", op[1], lease_s, now)
        if result.new:
            return ("new", result.record.attempt)
        return ("existing", result.record.attempt, result.record.state.value)
    if op[0] == "take_over":
        won = await log_.take_over(identity, "k", op[1], lease_s, now)
        return ("lost",) if won is None else ("won", won.attempt)
    if op[0] == "renew":
        return await log_.renew_lease(identity, "k", op[1], lease_s, now)
    if op[0] == "release":
        return await log_.release(identity, "k", op[1])
    if op[0] == "begin_run":
        return await _run_in_batch(st_, op, now, identity)
    tx = st_.kv_transaction(identity)
    tx.put("done_by", op[1])

    def failing(conn: sa.Connection) -> None:
        tx.apply(conn)
        raise LookupError("extra writes failed")

    extra = {"plain": None, "extra": tx.apply, "extra_fails": failing}[op[2]]
    try:
        done = await log_.complete(identity, "k", op[1], now=now, response=b"\x01", extra_writes=extra)
    except storage.LeaseLost:
        return ("lease_lost",)
    except LookupError:
        return ("extra_failed",)
    return ("completed", done.attempt)


async def _run_in_batch(st_: storage.Storage, op: tuple[Any, ...], now: float, identity: str) -> Any:
    tx = st_.kv_transaction(identity)
    tx.put("done_by", "run")

    def failing(conn: sa.Connection) -> None:
        tx.apply(conn)
        raise LookupError("extra writes failed")

    extra = {"plain": None, "extra": tx.apply, "extra_fails": failing, "transient": None}[op[2]]
    outcome = storage.Outcome(response=b"\x01", record=op[2] != "transient", extra_writes=extra)
    try:
        result = await st_.request_log.begin_and_run(
            identity, "k", "m", op[1], Model.lease_s, now, lambda: outcome
        )
    except LookupError:
        return ("extra_failed",)
    if isinstance(result, storage.RanResult):
        return ("ran", result.recorded)
    assert not result.new, "a batch on a worker thread: the model test keeps batches inline"
    return ("existing", result.record.attempt, result.record.state.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=rounds)
def test_request_log_matches_its_model(
    sqlite_url: str, schedule: list[tuple[float, list[tuple[Any, ...]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operations in one round queue together and commit in one batch (in queue order);
    every result, the row and the kv effects must equal applying them one by one.
    (Batches stay on the event loop's thread, where begin_and_run runs its handler.)"""
    import storage._appender as appender_module

    monkeypatch.setattr(appender_module, "INLINE_SLOW_BATCHES", 10**9)
    identity = f"model-{id(schedule)}-{len(schedule)}"

    async def main() -> None:
        model = Model()
        now = 0.0
        async with opened(sqlite_url) as st_:
            await st_.database.write(lambda conn: conn.execute(sa.delete(_schema.request_log)))
            await st_.database.write(lambda conn: conn.execute(sa.delete(_schema.kv)))
            await st_.appender.transact(lambda conn: None)  # opens the writer (on a thread)
            for dt, batch in schedule:
                now += dt
                expected = [model.apply(op, now) for op in batch]
                got: list[Any] = [None] * len(batch)

                async def one(out: list[Any], i: int, op: tuple[Any, ...], at: float) -> None:
                    out[i] = await _run(st_, op, at, identity)

                before = st_.appender.stats.batches_committed
                async with trio.open_nursery() as nursery:
                    async with st_.database.write_lock:
                        for i, op in enumerate(batch):
                            nursery.start_soon(one, got, i, op, now)
                            await trio.testing.wait_all_tasks_blocked()
                assert st_.appender.stats.batches_committed == before + 1  # one batch per round
                assert got == expected, (batch, got, expected)
                record = await st_.request_log.get(identity, "k")
                if model.row is None:
                    assert record is None
                else:
                    assert record is not None
                    assert (record.fingerprint, record.state.value, record.attempt) == (
                        model.row["fp"],
                        model.row["state"],
                        model.row["attempt"],
                    )
                    assert record.lease_expires_at == model.row["lease"]
                items = await st_.database.read(lambda conn: storage.kv_items(conn, identity))
                assert items == model.kv

    trio.run(main)
