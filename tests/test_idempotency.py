"""Idempotency keys end to end: a real server with a request log on SQLite and PostgreSQL,
a real client over loopback TCP (see specs/guarantees.md, "Exactly-once per idempotency key")."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio

import storage
import txrpc
from txrpc import _idempotency as idem
from txrpc._keyed import IdempotencyDriver
from txrpc._serve import ServeError, open_request_log, serve_services


class FakeClock:
    """An injectable wall clock (seconds) that only moves when told."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Counter:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    @property
    def count(self) -> int:
        return len(self.calls)


@contextlib.asynccontextmanager
async def serving(
    db_url: str, *services: txrpc.Service, **server_options: Any
) -> AsyncIterator[tuple[txrpc.Server, storage.Storage, txrpc.Client]]:
    # With the WAL flushed beside the writer (pipelined), so that every replay here goes
    # through sync(); `txrpc serve --db` flushes inside the commit, as
    # tests/test_keyed_one_write.py serves.
    async with storage.open_storage(db_url, pipelined_fsync=True) as st:
        server = txrpc.Server(*services, request_log=st, **server_options)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            async with txrpc.connect("127.0.0.1", server.port, rng=random.Random(1)) as client:
                yield server, st, client
            nursery.cancel_scope.cancel()


def driver(server: txrpc.Server) -> IdempotencyDriver:
    assert server.idempotency is not None
    return server.idempotency


def counting_service(counter: Counter, delay_s: float = 0.0) -> txrpc.Service:
    svc = txrpc.Service("calc")

    @svc.method
    async def add(a: int, b: int) -> int:
        counter.calls.append((a, b))
        if delay_s:
            await trio.sleep(delay_s)
        return a + b

    @svc.method
    async def lookup(name: str) -> str:
        counter.calls.append(name)
        raise txrpc.NotFound(f"no account {name!r}", {"name": name})

    @svc.method(idempotent=True)
    async def transfer(amount: int) -> dict[str, Any]:
        call = txrpc.current_call()
        counter.calls.append((call.idempotency_key, call.attempt))
        return {"moved": amount}

    @svc.method
    def square(x: int) -> int:  # a plain (inline) handler
        counter.calls.append(x)
        return x * x

    return svc


# --- the basic promise --------------------------------------------------------------


async def test_a_new_key_runs_once_and_a_repeat_is_replayed(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter)) as (server, st, client):
        keyed = client.options(idempotency_key="k-1", with_metadata=True)
        first = await keyed.calc.add(1, 2)
        assert first == txrpc.Reply(3, {}) and not first.replayed
        again = await keyed.calc.add(1, 2)
        assert again.value == 3 and again.replayed and again.metadata == {"replayed": True}
        assert await client.options(idempotency_key="k-1").calc.add(1, 2) == 3  # bare value
        assert counter.count == 1
        record = await st.request_log.get("anonymous", "k-1")
        assert record is not None and record.completed and record.replay_count == 2
        assert record.request == idem.canonical_request("calc.add", [1, 2], {})
        assert record.fingerprint == idem.fingerprint("calc.add", [1, 2], {})
        # Without a key the handler runs every time (one `if` on the hot path).
        assert await client.calc.add(1, 2) == 3
        assert await client.calc.add(1, 2) == 3
        assert counter.count == 3
        assert driver(server).executions == 1 and driver(server).replays == 2


async def test_an_error_outcome_is_recorded_and_replayed(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter)) as (_, st, client):
        keyed = client.options(idempotency_key="k-err")
        with pytest.raises(txrpc.NotFound) as first:
            await keyed.calc.lookup("zed")
        assert first.value.details == {"name": "zed"}
        with pytest.raises(txrpc.NotFound) as second:
            await keyed.calc.lookup("zed")
        assert second.value.message == first.value.message
        assert second.value.details == {"name": "zed", "replayed": True}
        assert counter.count == 1
        record = await st.request_log.get("anonymous", "k-err")
        assert record is not None and record.error is not None and record.error.code == txrpc.Code.NOT_FOUND


async def test_inline_handlers_take_keys_too(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter)) as (_, _st, client):
        keyed = client.options(idempotency_key="sq", with_metadata=True)
        assert (await keyed.calc.square(7)).value == 49
        assert (await keyed.calc.square(7)).replayed
        assert counter.count == 1


async def test_hundred_concurrent_calls_with_one_key_run_the_handler_once(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter, delay_s=0.2)) as (_, _st, client):
        outcomes: list[Any] = []

        async def one() -> None:
            try:
                outcomes.append(await client.options(idempotency_key="same", retries_max=0).calc.add(20, 22))
            except txrpc.RequestInProgress as exc:
                assert exc.details["retry_after_s"] >= 0
                outcomes.append("in progress")

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
        assert counter.count == 1
        assert len(outcomes) == 100 and set(outcomes) <= {42, "in progress"} and 42 in outcomes
        assert await client.options(idempotency_key="same").calc.add(20, 22) == 42
        assert counter.count == 1


async def test_hundred_concurrent_waiting_calls_all_get_the_one_answer(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter, delay_s=0.2)) as (_, _st, client):
        replies: list[txrpc.Reply] = []

        async def one() -> None:
            bound = client.options(idempotency_key="wait", wait=True, with_metadata=True, timeout=20)
            replies.append(await bound.calc.add(1, 1))

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(one)
        assert counter.count == 1
        assert [r.value for r in replies] == [2] * 100
        assert sum(not r.replayed for r in replies) == 1  # the executor's own answer


async def test_waiting_is_bounded_by_the_deadline(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter, delay_s=0.6)) as (_, _st, client):
        async with trio.open_nursery() as nursery:
            first: list[int] = []

            async def run_first() -> None:
                first.append(await client.options(idempotency_key="slow").calc.add(2, 2))

            nursery.start_soon(run_first)
            await trio.sleep(0.1)
            with pytest.raises(txrpc.DeadlineExceeded):
                await client.options(idempotency_key="slow", wait=True, timeout=0.1).calc.add(2, 2)
            waited = await client.options(
                idempotency_key="slow", wait=True, timeout=5, with_metadata=True
            ).calc.add(2, 2)
        assert first == [4] and waited == txrpc.Reply(4, {"replayed": True})
        assert counter.count == 1


async def test_same_key_with_another_payload_is_a_mismatch(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter, delay_s=0.3)) as (_, st, client):
        keyed = client.options(idempotency_key="k-m", retries_max=0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keyed.calc.add, 1, 2)
            await trio.sleep(0.1)
            with pytest.raises(txrpc.IdempotencyKeyMismatch):  # while the first one runs
                await keyed.calc.add(1, 3)
        with pytest.raises(txrpc.IdempotencyKeyMismatch) as caught:  # after it completed
            await keyed.calc.add(1, 3)
        assert caught.value.details == {"stored_method": "calc.add", "method": "calc.add"}
        with pytest.raises(txrpc.IdempotencyKeyMismatch):  # another method is another payload
            await keyed.calc.square(3)
        assert counter.count == 1
        record = await st.request_log.get("anonymous", "k-m")
        assert record is not None and record.fingerprint == idem.fingerprint("calc.add", [1, 2], {})


# --- mandatory keys and client-generated keys ------------------------------------------


async def test_an_idempotent_method_needs_a_key(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter)) as (_, _st, client):
        with pytest.raises(txrpc.InvalidArgument, match="needs an idempotency key"):
            await client.calc.transfer(5)
        assert counter.count == 0
        assert await client.options(idempotent=True).calc.transfer(5) == {"moved": 5}
        assert await client.options(idempotency_key="t1").calc.transfer(5) == {"moved": 5}
        assert counter.count == 2


async def test_generated_keys_come_from_the_seeded_rng_and_survive_retries(db_url: str) -> None:
    one = txrpc.Client(lambda: trio.open_tcp_stream("127.0.0.1", 1), rng=random.Random(7), connect_now=False)
    two = txrpc.Client(lambda: trio.open_tcp_stream("127.0.0.1", 1), rng=random.Random(7), connect_now=False)
    assert one.new_idempotency_key() == two.new_idempotency_key()
    assert len(one.new_idempotency_key()) == 32
    unseeded = [
        txrpc.Client(lambda: trio.open_tcp_stream("127.0.0.1", 1)).new_idempotency_key() for _ in range(2)
    ]
    assert unseeded[0] != unseeded[1]  # no fixed default seed: processes never share keys

    seen: list[tuple[str | None, int]] = []
    svc = txrpc.Service("flaky")

    @svc.method(idempotent=True)
    async def pay(amount: int) -> int:
        call = txrpc.current_call()
        seen.append((call.idempotency_key, call.attempt))
        if len(seen) == 1:
            # A transient failure: nothing is recorded, the key is released, the client
            # retries with the same key and the handler runs again.
            raise txrpc.Unavailable("downstream is restarting")
        return amount

    async with serving(db_url, svc) as (_, st, client):
        assert await client.options(idempotent=True).flaky.pay(9) == 9
        assert len(seen) == 2 and seen[0][0] == seen[1][0] and seen[0][0] is not None
        record = await st.request_log.get("anonymous", seen[0][0])
        assert record is not None and record.completed


def test_generated_keys_sort_in_the_order_they_were_made() -> None:
    """A counter (from a random start) leads each generated key, so one client's keys
    land at one place in the request log's index, not at random places."""

    def client(seed: int) -> txrpc.Client:
        return txrpc.Client(lambda: trio.open_tcp_stream("127.0.0.1", 1), rng=random.Random(seed), connect_now=False)

    one = client(3)
    keys = [one.new_idempotency_key() for _ in range(1000)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)
    assert len({k[12:] for k in keys}) == len(keys)  # 80 random bits after the counter
    others = [client(4).new_idempotency_key() for _ in range(3)]
    assert not set(others) & set(keys)
    one._key_seq = (1 << 48) - 1  # the counter wraps around (keys stay distinct)
    assert one.new_idempotency_key().startswith("000000000000")


async def test_a_server_without_a_request_log_refuses_keys() -> None:
    counter = Counter()
    server = txrpc.Server(counting_service(counter))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            with pytest.raises(txrpc.FailedPrecondition, match="no request log"):
                await client.options(idempotency_key="k").calc.add(1, 2)
            with pytest.raises(txrpc.InvalidArgument):
                await client.calc.transfer(1)
            assert await client.calc.add(1, 2) == 3
        nursery.cancel_scope.cancel()
    assert counter.count == 1


async def test_bad_keys_are_invalid_arguments(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter)) as (_, _st, client):
        for bad in ("", "x" * 256, "tab\there"):
            with pytest.raises(txrpc.InvalidArgument):
                await client.options(idempotency_key=bad).calc.add(1, 2)
        with pytest.raises(txrpc.InvalidArgument):
            await client.options(metadata={"idempotency_key": 17}).calc.add(1, 2)
        assert counter.count == 0


# --- leases, crashes and cancellation ---------------------------------------------------


async def test_an_expired_lease_is_taken_over_and_the_handler_runs_again(db_url: str) -> None:
    clock = FakeClock()
    counter = Counter()
    svc = counting_service(counter)
    async with serving(db_url, svc, wall_clock=clock, lease_s=30.0) as (_, st, client):
        # An executor that died mid-handler left this row (attempt 1, lease until +30 s).
        fp = idem.fingerprint("calc.transfer", [5], {})
        assert (await st.request_log.begin("anonymous", "orphan", "calc.transfer", fp, 30.0, clock.now)).new
        keyed = client.options(idempotency_key="orphan", retries_max=0)
        clock.advance(29.0)
        with pytest.raises(txrpc.RequestInProgress) as caught:
            await keyed.calc.transfer(5)
        assert caught.value.details["retry_after_s"] == pytest.approx(1.0)
        assert counter.count == 0
        clock.advance(1.0)  # the lease ends: presumed dead, taken over
        assert await keyed.calc.transfer(5) == {"moved": 5}
        assert counter.calls == [("orphan", 2)]
        record = await st.request_log.get("anonymous", "orphan")
        assert record is not None and record.completed and record.attempt == 2


async def test_a_cancelled_call_releases_its_key(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter, delay_s=0.5)) as (_, st, client):
        with pytest.raises(txrpc.DeadlineExceeded):
            await client.options(idempotency_key="c", timeout=0.1, retries_max=0).calc.add(1, 1)
        with trio.fail_after(5):
            while await st.request_log.get("anonymous", "c") is not None:
                await trio.sleep(0.02)  # released once the server sees the cancel
        assert await client.options(idempotency_key="c").calc.add(1, 1) == 2
        assert counter.count == 2  # nothing was recorded the first time: it ran again


async def test_a_long_handler_keeps_its_lease(db_url: str) -> None:
    counter = Counter()
    # The handler runs 3 leases long; renewals must each land within ~1/2 lease and the
    # last probe ~1 s before the handler ends (margins for a busy machine).
    async with serving(db_url, counting_service(counter, delay_s=3.0), lease_s=1.0) as (_, st, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.options(idempotency_key="long").calc.add, 3, 3)
            for _ in range(4):
                await trio.sleep(0.5)
                with pytest.raises(txrpc.RequestInProgress):
                    await client.options(idempotency_key="long", retries_max=0).calc.add(3, 3)
        assert counter.count == 1
        record = await st.request_log.get("anonymous", "long")
        assert record is not None and record.completed and record.attempt == 1


# --- retention ------------------------------------------------------------------------------


async def test_keys_are_forgotten_after_the_retention_window(db_url: str) -> None:
    clock = FakeClock()
    counter = Counter()
    svc = counting_service(counter)
    async with serving(db_url, svc, wall_clock=clock, retention_s=3600.0) as (server, st, client):
        keyed = client.options(idempotency_key="old")
        assert await keyed.calc.add(1, 1) == 2
        clock.advance(3599.0)
        assert await driver(server).prune_now() == 0
        assert await keyed.calc.add(1, 1) == 2 and counter.count == 1  # still replayed
        clock.advance(2.0)
        assert await driver(server).prune_now() == 1
        assert await st.request_log.get("anonymous", "old") is None
        assert await keyed.calc.add(1, 1) == 2 and counter.count == 2  # a new request now


async def test_the_pruner_runs_in_the_background(db_url: str) -> None:
    clock = FakeClock()
    counter = Counter()
    svc = counting_service(counter)
    options: dict[str, Any] = {"wall_clock": clock, "retention_s": 60.0, "prune_interval_s": 0.01}
    async with serving(db_url, svc, **options) as (server, st, client):
        assert driver(server).prune_interval_s == 1.0  # bounded below
        for n in range(3):
            await client.options(idempotency_key=f"p{n}").calc.add(n, n)
        clock.advance(61.0)
        with trio.fail_after(10):
            while (await st.request_log.stats()).total:
                await trio.sleep(0.1)
        assert driver(server).pruned == 3


def test_retention_defaults_to_a_day_and_the_interval_is_bounded() -> None:
    assert txrpc.Server().idempotency is None
    log = object.__new__(storage.RequestLog)  # the driver only keeps a reference
    day = IdempotencyDriver(log, wall_clock=lambda: 0.0)
    assert day.retention_s == 24 * 3600 and day.prune_interval_s == 3600.0
    week = IdempotencyDriver(log, wall_clock=lambda: 0.0, retention_s=7 * 86400)
    assert week.prune_interval_s == 3600.0
    short = IdempotencyDriver(log, wall_clock=lambda: 0.0, retention_s=60.0, prune_interval_s=1e9)
    assert short.prune_interval_s == 3600.0
    with pytest.raises(ValueError):
        IdempotencyDriver(log, wall_clock=lambda: 0.0, retention_s=10.0, lease_s=30.0)


# --- identity scoping --------------------------------------------------------------------


async def test_keys_are_scoped_per_caller_identity(db_url: str) -> None:
    counter = Counter()

    def identity_of(ctx: txrpc.CallContext) -> str:
        # A stand-in for authentication: the test says who the caller is.
        return str(ctx.metadata.get("test_identity", ctx.identity))

    async with serving(db_url, counting_service(counter), identity_of=identity_of) as (server, st, _):
        async with (
            txrpc.connect("127.0.0.1", server.port, metadata={"test_identity": "alice"}) as alice,
            txrpc.connect("127.0.0.1", server.port, metadata={"test_identity": "bob"}) as bob,
            txrpc.connect("127.0.0.1", server.port) as anonymous,
        ):
            assert await alice.options(idempotency_key="k").calc.add(1, 1) == 2
            assert await bob.options(idempotency_key="k").calc.add(5, 5) == 10  # no mismatch: other scope
            assert await anonymous.options(idempotency_key="k").calc.add(7, 7) == 14
            assert counter.count == 3
            assert await alice.options(idempotency_key="k").calc.add(1, 1) == 2  # replayed in alice's scope
            with pytest.raises(txrpc.IdempotencyKeyMismatch):
                await bob.options(idempotency_key="k").calc.add(1, 1)
            assert counter.count == 3
        rows = await st.request_log.list()
        assert sorted(r.identity for r in rows) == ["alice", "anonymous", "bob"]


async def test_every_caller_shares_the_anonymous_scope_by_default(db_url: str) -> None:
    counter = Counter()
    async with serving(db_url, counting_service(counter)) as (server, st, one):
        async with txrpc.connect("127.0.0.1", server.port) as two:  # another connection, another port
            assert await one.options(idempotency_key="shared").calc.add(2, 3) == 5
            reply = await two.options(idempotency_key="shared", with_metadata=True).calc.add(2, 3)
            assert reply == txrpc.Reply(5, {"replayed": True})
        assert counter.count == 1
        assert [r.identity for r in await st.request_log.list()] == ["anonymous"]


# --- exactly-once through the request's own store transaction -----------------------------


def bank_service(runs: Counter, namespace_hint: str = "") -> txrpc.Service:
    bank = txrpc.Service("bank")

    @bank.method(idempotent=True)
    async def deposit(account: str, amount: int) -> int:
        runs.calls.append(account)
        store = txrpc.current_call().store
        balance = await store.get(account, default=0)
        await trio.sleep(0.01)  # let concurrent deposits read the same balance
        store.put(account, balance + amount)
        if amount < 0:
            raise txrpc.FailedPrecondition("no negative deposits")  # recorded; its writes are not applied
        return int(balance + amount)

    @bank.method(idempotent=True)
    async def deposit_then_fail(account: str, amount: int) -> int:
        runs.calls.append(account)
        store = txrpc.current_call().store
        store.put(account, await store.get(account, default=0) + amount)
        raise txrpc.Unavailable("lost the downstream")  # transient: released, nothing applied

    return bank


def kv_items(db_url: str) -> dict[str, Any]:
    engine = storage.open_engine(db_url, create=False, read_only=True)
    try:
        with engine.connect() as conn:
            return storage.kv_items(conn, "")
    finally:
        engine.dispose()


async def test_store_writes_commit_with_the_outcome_exactly_once(db_url: str) -> None:
    runs = Counter()
    async with serving(db_url, bank_service(runs)) as (server, st, client):
        keyed = client.options(idempotency_key="dep-1", with_metadata=True)
        assert (await keyed.bank.deposit("alice", 10)).value == 10
        replay = await keyed.bank.deposit("alice", 10)
        assert replay == txrpc.Reply(10, {"replayed": True})
        assert kv_items(db_url) == {"alice": 10}  # applied once
        # Concurrent deposits with distinct keys: conflicts re-run, none is lost.
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(client.options(idempotency_key=f"c{n}").bank.deposit, "bob", 1)
        assert kv_items(db_url) == {"alice": 10, "bob": 20}
        assert driver(server).conflict_reruns > 0  # the optimistic store had to re-run some
        # An error outcome is recorded; the handler's writes are not applied.
        with pytest.raises(txrpc.FailedPrecondition):
            await client.options(idempotency_key="neg").bank.deposit("carol", -5)
        assert "carol" not in kv_items(db_url)
        record = await st.request_log.get("anonymous", "neg")
        assert record is not None and record.error is not None


async def test_store_writes_of_an_unrecorded_attempt_are_discarded(db_url: str) -> None:
    runs = Counter()
    async with serving(db_url, bank_service(runs)) as (_, st, client):
        with pytest.raises(txrpc.Unavailable):
            await client.options(idempotency_key="t", retries_max=2).bank.deposit_then_fail("dan", 5)
        assert runs.count == 3  # the client retried twice with the same key; each run released
        assert kv_items(db_url) == {}
        assert await st.request_log.get("anonymous", "t") is None


async def test_store_outside_a_keyed_call_is_an_error() -> None:
    svc = txrpc.Service()

    @svc.method
    async def peek() -> str:
        try:
            txrpc.current_call().store  # noqa: B018
        except RuntimeError as exc:
            return str(exc)
        return "no error"

    server = txrpc.Server(svc)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            assert "idempotency key" in await client.peek()
        nursery.cancel_scope.cancel()


# --- start-up failures through the serve helper -------------------------------------------


@contextlib.contextmanager
def read_only_file(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable for this process (chmod, or chattr +i as root)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root and `chattr +i` is unavailable: cannot make a file read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


async def expect_start_failure(db: str, *needles: str) -> str:
    svc = counting_service(Counter())
    with pytest.raises(ServeError) as caught:
        await serve_services([svc], db=db)  # fails before it listens
    message = caught.value.message
    assert message.startswith("cannot start: the request log database cannot be used.")
    for needle in needles:
        assert needle in message, message
    return message


async def test_a_corrupt_database_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "txrpc.db"
    path.write_bytes(b"this is not a database at all" * 300)
    await expect_start_failure(str(path), str(path), "not a usable SQLite database", "backup")


async def test_a_read_only_database_stops_start_up(tmp_path: Path) -> None:
    path = tmp_path / "txrpc.db"
    storage.open_engine(path).dispose()
    with read_only_file(path):
        await expect_start_failure(str(path), "read-only", "permissions")


async def test_a_database_from_a_newer_txrpc_stops_start_up(db_url: str) -> None:
    storage.open_engine(db_url).dispose()
    raw = sa.create_engine(db_url, poolclass=sa.NullPool)
    with raw.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO txrpc_schema (version, description, applied_at) VALUES (:v, 'future', 0)"),
            {"v": storage.SCHEMA_VERSION + 1},
        )
    raw.dispose()
    await expect_start_failure(db_url, f"schema version {storage.SCHEMA_VERSION + 1}", "Upgrade txrpc")


async def test_an_unreachable_database_stops_start_up() -> None:
    await expect_start_failure("postgresql+psycopg://postgres@127.0.0.1:1/test", "cannot reach database")


async def test_the_serve_helper_serves_with_a_request_log(db_url: str) -> None:
    counter = Counter()
    async with trio.open_nursery() as nursery:
        server: txrpc.Server = await nursery.start(
            lambda task_status: serve_services(
                [counting_service(counter)], db=db_url, task_status=task_status
            )
        )
        assert server.idempotency is not None
        async with txrpc.connect("127.0.0.1", server.port) as client:
            for _ in range(2):
                assert await client.options(idempotency_key="via-helper").calc.add(4, 4) == 8
        nursery.cancel_scope.cancel()
    assert counter.count == 1
    async with open_request_log(db_url) as st:
        record = await st.request_log.get("anonymous", "via-helper")
        assert record is not None and record.replay_count == 1


def test_storage_failures_map_to_retryable_errors() -> None:
    from txrpc._keyed import _storage_error

    full = _storage_error(storage.AppendQueueFull("busy"), before_run=True)
    assert isinstance(full, txrpc.ResourceExhausted) and full.nothing_ran
    lost = storage.BatchFailed("x", outcome_unknown=True)
    assert not _storage_error(lost, before_run=True).nothing_ran
    failed = _storage_error(storage.BatchFailed("x", outcome_unknown=False), before_run=True)
    assert isinstance(failed, txrpc.Unavailable) and failed.nothing_ran
    after = _storage_error(storage.BatchFailed("x", outcome_unknown=False), before_run=False)
    assert isinstance(after, txrpc.Unavailable) and not after.nothing_ran


# --- storage: the pipelined WAL flush (opt-in) ---------------------------------------------


async def test_pipelined_fsync_wakes_durable_writers_after_a_wal_flush(sqlite_url: str) -> None:
    fp = idem.fingerprint("m", [], {})
    async with storage.open_storage(sqlite_url, pipelined_fsync=True) as st:
        appender = st.appender
        assert appender.pipelined_fsync
        async with trio.open_nursery() as nursery:
            for n in range(20):

                async def one(n: int = n) -> None:
                    key = f"k{n}"
                    assert (await st.request_log.begin("a", key, "m", fp, 30.0, 1.0)).new
                    done = await st.request_log.complete("a", key, 1, now=2.0, response=b"\x01")
                    assert done.completed

                nursery.start_soon(one)
        stats = appender.stats
        assert stats.records_committed == 40 and 1 <= stats.wal_syncs <= 20
        await st.request_log.sync()  # returns once everything committed is flushed
        assert stats.wal_syncs >= 2
    # Committed and visible to a fresh engine (what the flush made durable).
    engine = storage.open_engine(sqlite_url, create=False, read_only=True)
    try:
        with engine.connect() as conn:
            assert storage.request_stats(conn).completed == 20
            (mode,) = conn.exec_driver_sql("PRAGMA synchronous").one()
            assert mode == 2  # FULL: pooled connections are restored after each commit
    finally:
        engine.dispose()


async def test_a_failed_wal_flush_fails_the_durable_writers_as_outcome_unknown(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp = idem.fingerprint("m", [], {})
    async with storage.open_storage(sqlite_url, pipelined_fsync=True) as st:
        assert (await st.request_log.begin("a", "k", "m", fp, 30.0, 1.0)).new

        def broken(self: Any) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(storage.GroupCommitAppender, "_fsync_wal", broken)
        with pytest.raises(storage.BatchFailed) as caught:
            await st.request_log.complete("a", "k", 1, now=2.0, response=b"\x01")
        assert caught.value.outcome_unknown
        with pytest.raises(storage.StorageUnavailable, match="flushing the WAL"):
            await st.request_log.sync()


async def test_pipelined_fsync_is_off_without_batching_and_on_postgres(db_url: str) -> None:
    async with storage.open_storage(db_url, pipelined_fsync=True, batching=False) as st:
        assert not st.appender.pipelined_fsync
        await st.request_log.sync()  # a no-op
    async with storage.open_storage(db_url, pipelined_fsync=True) as st:
        assert st.appender.pipelined_fsync == db_url.startswith("sqlite")


def test_run_serve_reports_a_bad_database_before_listening(tmp_path: Path) -> None:
    import io

    import click
    from rich.console import Console

    from txrpc._serve import parse_duration, run_serve

    path = tmp_path / "txrpc.db"
    path.write_bytes(b"garbage" * 1000)
    out = io.StringIO()
    with pytest.raises(ServeError) as caught:
        run_serve(
            [counting_service(Counter())], host="127.0.0.1", port=0, db=str(path), console=Console(file=out)
        )
    assert (
        isinstance(caught.value, click.ClickException)
        and "not a usable SQLite database" in caught.value.message
    )
    assert "serving" not in out.getvalue()
    assert (
        parse_duration("24h") == 86400.0 and parse_duration("90") == 90.0 and parse_duration("1.5m") == 90.0
    )
    for bad in ("0", "soon", "-1h"):
        with pytest.raises(click.BadParameter):
            parse_duration(bad)
