"""Keyed calls in one write: a handler that runs inline (a plain function, or an
``async def`` that never suspends), served with a SQLite request log, is run inside
the log's batch and recorded there as completed — one record, no in-progress row, no
task of its own on the server (``IdempotencyDriver.start``, ``RequestLog.begin_and_run``).
Each test checks what the path must keep of the general one (see specs/guarantees.md)."""

from __future__ import annotations

import contextlib
import contextvars
import math
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import storage
import txrpc
from txrpc._keyed import IdempotencyDriver

tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


@contextlib.asynccontextmanager
async def serving(
    sqlite_url: str, svc: txrpc.Service, **server_options: Any
) -> AsyncIterator[tuple[txrpc.Server, storage.Storage, txrpc.Client]]:
    async with storage.open_storage(sqlite_url) as st:  # as `txrpc serve --db` opens it
        server = txrpc.Server(svc, request_log=st, **server_options)

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            tenant.set("acme")  # a context variable set where the server runs
            await server.serve_tcp("127.0.0.1", 0, task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            async with txrpc.connect("127.0.0.1", server.port, rng=random.Random(1)) as client:
                yield server, st, client
            nursery.cancel_scope.cancel()


def service(ran: list[Any]) -> txrpc.Service:
    svc = txrpc.Service("s")

    @svc.method
    async def inline(x: int) -> int:  # never suspends
        call = txrpc.current_call()
        ran.append((x, call.idempotency_key, call.attempt, threading.get_ident(), tenant.get()))
        tenant.set(f"changed by {x}")  # stays with this call
        return x + 1

    @svc.method
    async def awaiting(x: int) -> int:
        ran.append((x, None, None, None))
        await trio.lowlevel.checkpoint()
        return x + 1

    @svc.method
    def deposit(account: str, amount: int) -> str:  # a plain function writing to the store
        ran.append((account, amount))
        txrpc.current_call().store.put(account, amount)
        if amount < 0:
            raise txrpc.InvalidArgument("negative amount: refused, and recorded as the answer")
        return "ok"

    @svc.method
    def deep(levels: int) -> Any:  # a value too deeply nested to encode
        ran.append(("deep", levels))
        value: Any = 0
        for _ in range(levels):
            value = [value]
        return value

    @svc.method
    async def flaky(x: int) -> int:
        ran.append(x)
        raise txrpc.Unavailable("try again later")

    return svc


def driver(server: txrpc.Server) -> IdempotencyDriver:
    assert server.idempotency is not None
    return server.idempotency


@contextlib.asynccontextmanager
async def batches_held(st: storage.Storage) -> AsyncIterator[None]:
    """Hold the database's write lock (the flusher writes no batch) for the block."""
    async with st.database.write_lock:
        yield


async def release_and_settle(st: storage.Storage, settle_s: float = 0.5) -> None:
    """Inside ``batches_held``: let the queued batches be written, then take the lock back."""
    st.database.write_lock.release()
    try:
        await trio.sleep(settle_s)
    finally:
        await st.database.write_lock.acquire()


async def test_an_inline_handler_is_run_and_recorded_in_one_write(sqlite_url: str) -> None:
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (server, st, client):
        stats = st.appender.stats
        await client.options(idempotency_key="warm").s.inline(0)  # opens the writer (on a thread)
        before = stats.records_committed
        keyed = client.options(idempotency_key="k-1", with_metadata=True)
        first = await keyed.s.inline(41)
        assert first.value == 42 and not first.replayed
        assert stats.records_committed - before == 1  # one record: run and recorded together
        assert ran[-1][:3] == (41, "k-1", 1)  # current_call() is the call's own
        assert ran[-1][3] == threading.get_ident()  # on the event loop's thread
        assert ran[-1][4] == "acme"  # in a copy of the server's context, not the log flusher's
        assert await client.options(idempotency_key="k-3").s.inline(43) == 44
        assert ran[-1][4] == "acme"  # what the previous call set stayed with it
        record = await st.request_log.get("anonymous", "k-1")
        assert record is not None and record.completed and record.attempt == 1
        again = await keyed.s.inline(41)
        assert again.value == 42 and again.replayed and len(ran) == 3
        # A handler that awaits takes the general path: in progress, then completed.
        before = stats.records_committed
        assert await client.options(idempotency_key="k-2").s.awaiting(1) == 2
        assert stats.records_committed - before == 2
        assert driver(server).executions == 4


async def test_a_batch_on_a_worker_thread_begins_and_completes_as_usual(sqlite_url: str) -> None:
    """When the batch is written on a worker thread (the inline path paused, or the
    database busy), the handler cannot run inside it: the record begins the call
    instead and the handler runs on the event loop, then completes it."""
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (_server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)
        st.appender._inline_paused_until = math.inf  # every batch on a worker thread
        before = st.appender.stats.records_committed
        assert await client.options(idempotency_key="k").s.inline(1) == 2
        assert st.appender.stats.records_committed - before == 2  # begin, then complete
        assert ran[-1][:3] == (1, "k", 1) and ran[-1][3] == threading.get_ident()
        assert ran[-1][4] == "acme"  # the task that goes on runs in the call's context
        record = await st.request_log.get("anonymous", "k")
        assert record is not None and record.completed and record.attempt == 1
        reply = await client.options(idempotency_key="k", with_metadata=True).s.inline(1)
        assert reply.replayed and len(ran) == 2


@pytest.mark.parametrize("batch_on", ["event loop", "worker thread"])
async def test_a_deadline_that_passes_while_queued_runs_nothing(sqlite_url: str, batch_on: str) -> None:
    """Started without a task, the call has no cancel scope: its deadline is checked when
    its batch is written. Passed: the handler does not run, nothing is recorded (on a
    worker thread the row the batch began is released), the caller gets
    DEADLINE_EXCEEDED from the server, and the key is free for a retry."""
    ran: list[Any] = []
    limits = txrpc.Limits(call_timeout_max_s=0.2)
    async with serving(sqlite_url, service(ran), limits=limits) as (_server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)
        if batch_on == "worker thread":
            st.appender._inline_paused_until = math.inf
        keyed = client.options(idempotency_key="late", timeout=5.0, retries_max=0)
        async with batches_held(st):
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    with pytest.raises(txrpc.DeadlineExceeded, match="expired on the server"):
                        await keyed.s.inline(1)

                nursery.start_soon(call)
                await trio.sleep(0.4)  # past the server's deadline, still queued
                nursery.cancel_scope.deadline = trio.current_time() + 5.0
                await release_and_settle(st)
        assert len(ran) == 1  # only the warm-up ran
        assert await st.request_log.get("anonymous", "late") is None
        assert await keyed.s.inline(1) == 2  # the key was never taken
        assert len(ran) == 2


async def test_a_plain_handlers_store_writes_commit_with_its_outcome(sqlite_url: str) -> None:
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (_server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)  # opens the writer (on a thread)
        keyed = client.options(idempotency_key="d-1")
        before = st.appender.stats.records_committed
        assert await keyed.s.deposit("alice", 5) == "ok"
        assert st.appender.stats.records_committed - before == 1  # written in the batch, with the row
        assert await keyed.s.deposit("alice", 5) == "ok"  # replayed: no second write
        assert (await st.database.read(lambda conn: storage.kv_read(conn, "", "alice")))[0] == 5
        assert len(ran) == 2
        # An error outcome is recorded, its writes discarded.
        refused = client.options(idempotency_key="d-2")
        for _ in range(2):
            with pytest.raises(txrpc.InvalidArgument, match="negative"):
                await refused.s.deposit("bob", -1)
        assert len(ran) == 3
        assert (await st.database.read(lambda conn: storage.kv_read(conn, "", "bob")))[1] == 0  # absent
        record = await st.request_log.get("anonymous", "d-2")
        assert record is not None and record.completed and record.error is not None


async def test_a_transient_error_is_not_recorded(sqlite_url: str) -> None:
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (_server, st, client):
        keyed = client.options(idempotency_key="f", retries_max=0)
        for attempt in (1, 2):
            with pytest.raises(txrpc.Unavailable, match="try again later"):
                await keyed.s.flaky(1)
            assert len(ran) == attempt  # each retry runs the handler afresh
        assert await st.request_log.get("anonymous", "f") is None


async def test_concurrent_calls_with_one_key_run_an_inline_handler_once(sqlite_url: str) -> None:
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (_server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)  # opens the writer (on a thread)
        begins: list[str] = []
        real_begin = st.request_log.begin

        async def begin(identity: str, key: str, *args: Any, **kwargs: Any) -> storage.BeginResult:
            begins.append(key)
            return await real_begin(identity, key, *args, **kwargs)

        st.request_log.begin = begin  # type: ignore[method-assign]  # (a spy: the real begin runs)
        keyed = client.options(idempotency_key="same", wait=True, with_metadata=True)
        replies: list[txrpc.Reply] = []

        async def one() -> None:
            replies.append(await keyed.s.inline(7))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        assert len(ran) == 2
        assert begins == []  # every call took the one-write path (the general one begins the key)
        assert all(r.value == 8 for r in replies) and len(replies) == 50
        assert sum(not r.replayed for r in replies) == 1


@pytest.mark.parametrize("batch_on", ["event loop", "worker thread"])
async def test_a_caller_that_leaves_before_its_batch_runs_nothing(sqlite_url: str, batch_on: str) -> None:
    """As a queued call of the general path is withdrawn when its caller leaves: the
    handler does not run, nothing stays recorded (a row the batch began on a worker
    thread is released), a retry on another connection runs, and the server serves on."""
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)
        if batch_on == "worker thread":
            st.appender._inline_paused_until = math.inf
        async with batches_held(st):
            async with txrpc.connect("127.0.0.1", server.port, rng=random.Random(2)) as leaver:
                # (No deadline: the client would pass one on, and it would pass first.)
                async with trio.open_nursery() as nursery:

                    async def call() -> None:
                        await leaver.options(idempotency_key="gone").s.inline(3)

                    nursery.start_soon(call)
                    await trio.sleep(0.2)
                    assert st.appender.queued == 1
                    nursery.cancel_scope.cancel()
            await trio.sleep(0.2)  # the server sees the connection close
            await release_and_settle(st)
        assert [r[:3] for r in ran] == [(0, "warm", 1)]
        assert await st.request_log.get("anonymous", "gone") is None
        assert await client.options(idempotency_key="gone", retries_max=0).s.inline(3) == 4
        assert await client.options(idempotency_key="next").s.inline(9) == 10


async def test_a_call_cancelled_by_its_caller_while_queued_runs_nothing(sqlite_url: str) -> None:
    """A Cancel frame for a call waiting for its batch (it has no cancel scope to cancel):
    the handler does not run, nothing is recorded, the connection serves on."""
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (_server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)
        async with batches_held(st):
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    await client.options(idempotency_key="cancelled").s.inline(5)

                nursery.start_soon(call)
                await trio.sleep(0.2)
                assert st.appender.queued == 1
                nursery.cancel_scope.cancel()  # no deadline on the call: a Cancel frame
            await trio.sleep(0.2)  # the Cancel frame reaches the server
            await release_and_settle(st)
        assert [r[:3] for r in ran] == [(0, "warm", 1)]
        assert await st.request_log.get("anonymous", "cancelled") is None
        assert await client.options(idempotency_key="cancelled").s.inline(5) == 6


async def test_a_value_that_cannot_be_encoded_fails_its_own_call_only(sqlite_url: str) -> None:
    """A handler's value nested too deeply to encode is its call's INTERNAL error
    (recorded); another call in the same batch, from another connection, is unharmed."""
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)
        results: dict[str, Any] = {}
        async with txrpc.connect("127.0.0.1", server.port, rng=random.Random(2)) as other:
            async with batches_held(st):
                async with trio.open_nursery() as nursery:

                    async def good() -> None:
                        results["good"] = await other.options(idempotency_key="good", retries_max=0).s.inline(1)

                    async def bad() -> None:
                        with pytest.raises(txrpc.Internal, match="cannot carry") as caught:
                            await client.options(idempotency_key="bad", retries_max=0).s.deep(5000)
                        results["bad"] = caught.value

                    nursery.start_soon(good)
                    nursery.start_soon(bad)
                    await trio.sleep(0.2)
                    assert st.appender.queued == 2
                    await release_and_settle(st)
        assert results["good"] == 2
        good_row = await st.request_log.get("anonymous", "good")
        bad_row = await st.request_log.get("anonymous", "bad")
        assert good_row is not None and good_row.completed
        assert bad_row is not None and bad_row.error is not None


class _BrokenLookupEnv:
    """A minimal environment with the simulator's test-only switch that makes every
    request-log lookup miss (each retry runs again: what its checkers must catch)."""

    node = "n"

    async def open_stream(self, host: str, port: int) -> Any:
        return await trio.open_tcp_stream(host, port)

    async def open_listeners(self, host: str, port: int) -> Any:
        return list(await trio.open_tcp_listeners(port, host=host))

    def wall_time(self) -> float:
        return 1_000_000.0

    def buggify(self, name: str) -> bool:
        return False

    def crash_point(self, name: str) -> None:
        pass

    def broken(self, name: str) -> bool:
        return name == "server.skip_request_log_lookup"


async def test_under_the_broken_lookup_switch_a_handler_still_sees_the_callers_key(sqlite_url: str) -> None:
    """The switch renames the key internally; the simulator's duplicate-execution check
    counts executions under current_call().idempotency_key, so that must stay the
    caller's key on every path (here: answer() -> the one write, an inline handler)."""
    from txrpc import _env

    _env.current.set(_BrokenLookupEnv())  # type: ignore[arg-type]
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (_server, _st, client):
        assert await client.options(idempotency_key="warm").s.inline(0) == 1  # opens the writer
        assert await client.options(idempotency_key="k1").s.inline(1) == 2
        assert await client.options(idempotency_key="k1").s.inline(1) == 2  # runs again: broken
    assert [r[:3] for r in ran] == [(0, "warm", 1), (1, "k1", 1), (1, "k1", 1)]

