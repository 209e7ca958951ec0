"""Keyed calls in one write: a handler that runs inline (a plain function, or an
``async def`` that never suspends), served with a SQLite request log, is run inside
the log's batch and recorded there as completed — one record, no in-progress row, no
task of its own on the server (``IdempotencyDriver.start``, ``RequestLog.begin_and_run``).
Each test checks what the path must keep of the general one (see specs/guarantees.md)."""

from __future__ import annotations

import contextlib
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


@contextlib.asynccontextmanager
async def serving(
    sqlite_url: str, svc: txrpc.Service, **server_options: Any
) -> AsyncIterator[tuple[txrpc.Server, storage.Storage, txrpc.Client]]:
    async with storage.open_storage(sqlite_url, pipelined_fsync=True) as st:
        server = txrpc.Server(svc, request_log=st, **server_options)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            async with txrpc.connect("127.0.0.1", server.port, rng=random.Random(1)) as client:
                yield server, st, client
            nursery.cancel_scope.cancel()


def service(ran: list[Any]) -> txrpc.Service:
    svc = txrpc.Service("s")

    @svc.method
    async def inline(x: int) -> int:  # never suspends
        call = txrpc.current_call()
        ran.append((x, call.idempotency_key, call.attempt, threading.get_ident()))
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
    async def flaky(x: int) -> int:
        ran.append(x)
        raise txrpc.Unavailable("try again later")

    return svc


def driver(server: txrpc.Server) -> IdempotencyDriver:
    assert server.idempotency is not None
    return server.idempotency


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
        record = await st.request_log.get("anonymous", "k-1")
        assert record is not None and record.completed and record.attempt == 1
        again = await keyed.s.inline(41)
        assert again.value == 42 and again.replayed and len(ran) == 2
        # A handler that awaits takes the general path: in progress, then completed.
        before = stats.records_committed
        assert await client.options(idempotency_key="k-2").s.awaiting(1) == 2
        assert stats.records_committed - before == 2
        assert driver(server).executions == 3


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
        record = await st.request_log.get("anonymous", "k")
        assert record is not None and record.completed and record.attempt == 1
        reply = await client.options(idempotency_key="k", with_metadata=True).s.inline(1)
        assert reply.replayed and len(ran) == 2


async def test_a_deadline_that_passes_while_queued_runs_nothing(sqlite_url: str) -> None:
    """Started without a task, the call has no cancel scope: its deadline is checked when
    its batch is written. Passed: the handler does not run, nothing is recorded, the
    caller gets DEADLINE_EXCEEDED from the server, and the key is free for a retry."""
    ran: list[Any] = []
    limits = txrpc.Limits(call_timeout_max_s=0.2)
    async with serving(sqlite_url, service(ran), limits=limits) as (_server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)
        keyed = client.options(idempotency_key="late", timeout=5.0, retries_max=0)
        async with st.database.write_lock:  # the flusher cannot start a batch
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    with pytest.raises(txrpc.DeadlineExceeded, match="expired on the server"):
                        await keyed.s.inline(1)

                nursery.start_soon(call)
                await trio.sleep(0.4)  # past the server's deadline, still queued
                nursery.cancel_scope.deadline = trio.current_time() + 5.0
                st.database.write_lock.release()
                try:
                    await trio.sleep(0)
                finally:
                    await st.database.write_lock.acquire()
        assert len(ran) == 1  # only the warm-up ran
        assert await st.request_log.get("anonymous", "late") is None
        assert await keyed.s.inline(1) == 2  # the key was never taken
        assert len(ran) == 2


async def test_a_plain_handlers_store_writes_commit_with_its_outcome(sqlite_url: str) -> None:
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (_server, st, client):
        keyed = client.options(idempotency_key="d-1")
        assert await keyed.s.deposit("alice", 5) == "ok"
        assert await keyed.s.deposit("alice", 5) == "ok"  # replayed: no second write
        assert (await st.database.read(lambda conn: storage.kv_read(conn, "", "alice")))[0] == 5
        assert len(ran) == 1
        # An error outcome is recorded, its writes discarded.
        refused = client.options(idempotency_key="d-2")
        for _ in range(2):
            with pytest.raises(txrpc.InvalidArgument, match="negative"):
                await refused.s.deposit("bob", -1)
        assert len(ran) == 2
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
    async with serving(sqlite_url, service(ran)) as (_server, _st, client):
        keyed = client.options(idempotency_key="same", wait=True, with_metadata=True)
        replies: list[txrpc.Reply] = []

        async def one() -> None:
            replies.append(await keyed.s.inline(7))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        assert len(ran) == 1
        assert all(r.value == 8 for r in replies) and len(replies) == 50
        assert sum(not r.replayed for r in replies) == 1


async def test_a_caller_that_leaves_before_its_batch_does_not_hurt_the_server(sqlite_url: str) -> None:
    """The reply comes from the log's flusher; the connection may be gone by then: the
    outcome is recorded, nothing is sent, and the server serves everyone else."""
    ran: list[Any] = []
    async with serving(sqlite_url, service(ran)) as (server, st, client):
        await client.options(idempotency_key="warm").s.inline(0)
        async with st.database.write_lock:
            async with txrpc.connect("127.0.0.1", server.port, rng=random.Random(2)) as leaver:
                # (No deadline: the client would pass one on, and it would pass first.)
                async with trio.open_nursery() as nursery:

                    async def call() -> None:
                        await leaver.options(idempotency_key="gone").s.inline(3)

                    nursery.start_soon(call)
                    await trio.sleep(0.2)
                    assert st.appender.queued == 1
                    nursery.cancel_scope.cancel()
            await trio.sleep(0.1)  # the server sees the connection close
        with trio.fail_after(5):
            while await st.request_log.get("anonymous", "gone") is None:
                await trio.sleep(0.01)
        assert [r[:3] for r in ran] == [(0, "warm", 1), (3, "gone", 1)]
        assert await client.options(idempotency_key="next").s.inline(9) == 10
