"""The RPC core end to end over real TCP on loopback."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import txrpc
from txrpc import _connection as wire


def make_service() -> tuple[txrpc.Service, dict[str, Any]]:
    calc = txrpc.Service()
    seen: dict[str, Any] = {"cancelled": trio.Event(), "running": 0, "running_max": 0, "deadlines": []}

    @calc.method
    async def add(a: int, b: int) -> int:
        return a + b

    @calc.method
    def mul(a: int, b: int) -> int:  # plain function: runs inline
        return a * b

    @calc.method
    async def greet(name: str, *, punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    @calc.method
    async def sleep(seconds: float) -> str:
        seen["running"] += 1
        seen["running_max"] = max(seen["running_max"], seen["running"])
        seen["deadlines"].append(txrpc.current_call().remaining_s())
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            seen["cancelled"].set()
            raise
        finally:
            seen["running"] -= 1
        return "slept"

    @calc.method
    async def fail(kind: str) -> None:
        if kind == "value":
            raise ValueError("bad value")
        if kind == "not_found":
            raise txrpc.NotFound("no such account", details={"account": "alice"})
        if kind == "type":
            raise TypeError("a TypeError from inside the handler")
        raise txrpc.Aborted(kind)

    @calc.method
    async def unencodable() -> object:
        return object()

    @calc.method
    async def whoami() -> dict[str, Any]:
        ctx = txrpc.current_call()
        return {"method": ctx.method, "metadata": ctx.metadata, "peer": ctx.peer}

    return calc, seen


@pytest.fixture
async def served() -> AsyncIterator[tuple[txrpc.Server, dict[str, Any]]]:
    service, seen = make_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        yield server, seen
        await server.shutdown(grace_s=1)


async def test_basic_calls(served: tuple[txrpc.Server, dict[str, Any]]) -> None:
    server, _ = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        assert await client.add(1, 2) == 3
        assert await client.call("add", 40, 2) == 42
        assert await client.mul(6, 7) == 42
        assert await client.greet("ann") == "hello ann!"
        assert await client.greet("bob", punctuation="?") == "hello bob?"
        assert await client.add([1], [2]) == [1, 2]
        assert await client.add(b"ab", b"cd") == b"abcd"
        assert await client.add(2**70, 1) == 2**70 + 1


def test_which_async_handlers_never_suspend() -> None:
    """Only a plain ``async def`` with no suspension point is run inline."""
    from txrpc._service import _never_suspends

    async def adds(a: int, b: int) -> int:
        return a + b

    async def awaits() -> None:
        await trio.sleep(0)

    async def uses_async_with(lock: trio.Lock) -> None:
        async with lock:
            pass

    async def uses_async_for(stream: Any) -> list[Any]:
        return [x async for x in stream]

    def plain() -> int:
        return 1

    class Handlers:
        async def method(self) -> int:
            return 2

    import functools

    @functools.wraps(adds)
    async def wrapped(a: int, b: int) -> int:
        return a - b

    assert _never_suspends(adds) and _never_suspends(Handlers().method)
    for fn in (awaits, uses_async_with, uses_async_for, plain, functools.partial(adds, 1), wrapped):
        assert not _never_suspends(fn), fn


async def test_handlers_that_never_suspend_run_on_the_read_loop() -> None:
    """An ``async def`` without ``await`` runs on the connection's read loop (no task of
    its own); one that awaits gets its own task. Both see their call's context."""
    svc = txrpc.Service()

    @svc.method
    async def task_of_plain() -> tuple[int, float]:
        return id(trio.lowlevel.current_task()), txrpc.current_call().remaining_s()

    @svc.method
    async def task_of_awaiting() -> tuple[int, float]:
        await trio.lowlevel.checkpoint()
        return id(trio.lowlevel.current_task()), txrpc.current_call().remaining_s()

    assert svc.methods["task_of_plain"].never_suspends
    assert not svc.methods["task_of_awaiting"].never_suspends
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(svc).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            first, remaining = await client.options(timeout=30).task_of_plain()
            second, _ = await client.task_of_plain()
            assert first == second  # the same task: the connection's read loop
            assert 0 < remaining <= 30  # the call's own deadline, not the loop's
            awaited = {(await client.task_of_awaiting())[0] for _ in range(3)}
            assert first not in awaited
        await server.shutdown()


async def test_context_variables_set_by_an_inline_handler_stay_with_its_call() -> None:
    import contextvars

    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")
    svc = txrpc.Service()

    @svc.method
    async def set_and_get(value: str) -> str:
        before = tenant.get()
        tenant.set(value)
        return before

    assert svc.methods["set_and_get"].never_suspends
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(svc).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            assert await client.set_and_get("a") == "none"
            assert await client.set_and_get("b") == "none"  # not "a": nothing leaked
        await server.shutdown()


async def test_dotted_service_names() -> None:
    bank = txrpc.Service("bank.accounts")

    @bank.method
    async def balance(name: str) -> int:
        return len(name)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(bank).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            assert await client.bank.accounts.balance("alice") == 5
            assert await client.call("bank.accounts.balance", "bo") == 2
            with pytest.raises(txrpc.Unimplemented):
                await client.balance("alice")
        await server.shutdown()


async def test_thousand_concurrent_calls_on_one_connection(
    served: tuple[txrpc.Server, dict[str, Any]],
) -> None:
    server, _ = served
    results: dict[int, int] = {}
    async with txrpc.connect("127.0.0.1", server.port) as client:

        async def one(i: int) -> None:
            results[i] = await client.add(i, i * 1000)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(1000):
                    nursery.start_soon(one, i)
        assert server.connection_count == 1
    assert results == {i: i + i * 1000 for i in range(1000)}


async def test_client_deadline_cancels_the_handler(served: tuple[txrpc.Server, dict[str, Any]]) -> None:
    server, seen = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        started = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.3):
                await client.sleep(30)
        assert trio.current_time() - started < 2
        with trio.fail_after(5):
            await seen["cancelled"].wait()  # the server-side handler saw the cancellation
        # The deadline travelled with the call: the handler saw at most 0.3 s remaining.
        assert 0 < seen["deadlines"][-1] <= 0.3
        assert await client.add(1, 1) == 2  # the connection is still fine


async def test_an_explicit_call_deadline_ends_the_call_and_cancels_the_handler(
    served: tuple[txrpc.Server, dict[str, Any]],
) -> None:
    """The cluster client's per-operation path bounds a call by a deadline it passes in,
    not by a cancel scope: at the deadline the call ends with DeadlinePassed, the server
    is told to cancel, and the deadline travelled with the call, as with a scope."""
    from txrpc._client import DeadlinePassed

    server, seen = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        started = trio.current_time()
        with pytest.raises(DeadlinePassed):
            await client._call_once("sleep", (30,), {}, {}, started + 0.3)
        assert 0.3 <= trio.current_time() - started < 2
        with trio.fail_after(5):
            await seen["cancelled"].wait()  # the server-side handler saw the cancellation
        assert 0 < seen["deadlines"][-1] <= 0.3
        # An enclosing scope's nearer deadline still wins (and is what the server sees).
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
            await client._call_once("sleep", (30,), {}, {}, trio.current_time() + 30)
        assert 0 < seen["deadlines"][-1] <= 0.2
        assert await client._call_once("add", (1, 1), {}, {}, trio.current_time() + 5) == 2


async def _bare_client(client_conn: wire.Connection, port: int) -> trio.SocketStream:
    """A TCP connection to the server at ``port`` driven by hand through ``client_conn``
    (the test controls every frame, and when it closes): hello sent and answered."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(client_conn.send_hello())
    with trio.fail_after(5):
        while not any(isinstance(e, wire.Hello) for e in client_conn.receive_data(await stream.receive_some())):
            pass
    return stream


def _bounded_service() -> tuple[txrpc.Service, dict[str, Any]]:
    """``hold`` waits for the test's event; registered ``bounded=True`` (no scope per call)."""
    service = txrpc.Service()
    seen: dict[str, Any] = {"release": trio.Event(), "started": trio.Event(), "done": 0, "cancelled": 0}

    async def hold() -> str:
        call = txrpc.current_call()
        seen["effective_deadline"] = trio.current_effective_deadline()
        seen["call_deadline"] = call.deadline
        seen["started"].set()
        try:
            await seen["release"].wait()
        except trio.Cancelled:
            seen["cancelled"] += 1
            raise
        seen["done"] += 1
        return "held"

    async def ran() -> int:
        seen["ran"] = seen.get("ran", 0) + 1
        await trio.lowlevel.checkpoint()
        return seen["ran"]

    service.add_method(hold, name="hold", bounded=True)
    service.add_method(ran, name="ran", bounded=True)
    return service, seen


async def test_a_bounded_handler_runs_without_a_scope_and_its_cancelled_answer_is_dropped() -> None:
    """A method registered ``bounded=True`` runs without the per-call cancel scope: its
    deadline and its caller's cancel do not interrupt it (the caller's own deadline ends
    the call for the caller), it answers nobody once cancelled, and the connection goes
    on serving."""
    from txrpc._client import DeadlinePassed

    service, seen = _bounded_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            started = trio.current_time()
            with pytest.raises(DeadlinePassed):
                await client._call_once("hold", (), {}, {}, started + 0.3)
            assert 0.3 <= trio.current_time() - started < 2
            # No scope of its own: the call's deadline is known to it, but bounds nothing.
            assert math.isfinite(seen["call_deadline"])
            assert seen["effective_deadline"] == math.inf
            await trio.sleep(0.3)  # past the server's copy of the deadline too
            assert seen["cancelled"] == 0 and seen["done"] == 0  # still waiting, not cancelled
            seen["release"].set()
            with trio.fail_after(5):
                while seen["done"] == 0:
                    await trio.sleep(0.01)
            # Its answer was dropped (the call was cancelled), and the connection serves on.
            assert await client.ran() == 1
            (conn,) = server._connections
            assert not conn.unscoped and not conn.conn.inflight and not conn.cancelled_by_peer
        nursery.cancel_scope.cancel()


async def test_a_bounded_handler_is_cancelled_when_its_connection_closes() -> None:
    """A bounded handler has no scope of its own, but it runs in its connection's
    nursery: when the peer goes away the handler is cancelled (nobody is left to answer)
    and the connection ends, not held open by the handler's wait."""
    service, seen = _bounded_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            async with trio.open_nursery() as calls:
                calls.start_soon(client.hold)
                with trio.fail_after(5):
                    await seen["started"].wait()
                (conn,) = server._connections
                assert conn.unscoped  # running, without a scope
                calls.cancel_scope.cancel()
        started = trio.current_time()
        with trio.fail_after(5):
            while server._connections or seen["cancelled"] == 0:
                await trio.sleep(0.01)
        assert trio.current_time() - started < 2  # at once, not after a flush timeout
        assert seen["cancelled"] == 1 and seen["done"] == 0
        nursery.cancel_scope.cancel()


async def test_a_draining_connection_closes_once_an_answer_given_later_is_sent() -> None:
    """A shutdown waits for a call that ``try_now`` answered with a ``Later`` (it is in
    flight), sends its answer when it is settled, and then the server closes the
    connection itself, at once: the peer here is a bare client that never closes its
    side, so nothing else would end the connection before the shutdown's grace."""
    service = txrpc.Service()
    pending: list[txrpc.Later] = []

    async def echo(x: int) -> int:
        await trio.lowlevel.checkpoint()  # (a method that never suspends runs inline, not tried)
        return x

    def try_now(args: Any, kwargs: dict[str, Any]) -> Any:
        later = txrpc.Later()
        pending.append(later)
        return later

    service.add_method(echo, name="echo").try_now = try_now
    client_conn = wire.Connection(wire.Role.CLIENT)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        stream = await _bare_client(client_conn, server.port)
        await stream.send_all(client_conn.send_call(1, "echo", [1]))
        with trio.fail_after(5):
            while not pending:
                await trio.sleep(0.01)
        stopped = trio.Event()

        async def shut_down() -> None:
            await server.shutdown(grace_s=30)
            stopped.set()

        nursery.start_soon(shut_down)
        events: list[Any] = []
        with trio.fail_after(5):
            while not events:
                events += client_conn.receive_data(await stream.receive_some())
        with trio.move_on_after(0.2):
            while True:
                events += client_conn.receive_data(await stream.receive_some())
        assert [type(e) for e in events] == [wire.GoAway] and not stopped.is_set()  # held open by the call
        settled = trio.current_time()
        pending[0].resolve("later")
        with trio.fail_after(5):
            while data := await stream.receive_some():  # until the server closes
                events += client_conn.receive_data(data)
            await stopped.wait()
        assert trio.current_time() - settled < 2
        assert [(e.id, e.value) for e in events if isinstance(e, wire.Result)] == [(1, "later")]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_bounded_call_already_past_its_deadline_does_not_run() -> None:
    """A bounded call whose deadline passed before it was dispatched is answered
    DEADLINE_EXCEEDED without running (nothing else would end it)."""
    service, seen = _bounded_service()
    client_conn = wire.Connection(wire.Role.CLIENT)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        stream = await _bare_client(client_conn, server.port)
        await stream.send_all(client_conn.send_call(1, "ran", [], deadline_s=0.0) + client_conn.send_call(2, "ran", []))
        answers: dict[int, Any] = {}
        with trio.fail_after(5):
            while len(answers) < 2:
                for event in client_conn.receive_data(await stream.receive_some()):
                    if isinstance(event, (wire.Result, wire.Error)):
                        answers[event.id] = event
        assert isinstance(answers[1], wire.Error) and answers[1].code == txrpc.Code.DEADLINE_EXCEEDED
        assert isinstance(answers[2], wire.Result) and answers[2].value == 1  # only the second ran
        assert seen["ran"] == 1
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_retried_call_by_deadline_retries_what_did_not_run_and_ends_at_its_deadline() -> None:
    """``Client._call_retried`` (the coordinator's calls to participants): a call refused
    before it ran is retried after a backoff, as ``client.call`` does; one that ran and
    failed is not; and the deadline ends the call, the backoff included."""
    from txrpc._client import DeadlinePassed

    service = txrpc.Service()
    attempts = {"flaky": 0, "refused": 0, "failed": 0}

    @service.method
    async def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise txrpc.Unavailable("not yet", {"not_started": True})
        return "ok"

    @service.method
    async def refused() -> str:
        attempts["refused"] += 1
        raise txrpc.Unavailable("never", {"not_started": True})

    @service.method
    async def failed() -> str:
        attempts["failed"] += 1
        raise txrpc.Unavailable("ran, then failed")

    @service.method
    async def sleep(seconds: float) -> None:
        await trio.sleep(seconds)

    limits = txrpc.Limits(reconnect_backoff_s=0.05, reconnect_backoff_max_s=0.05)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port, limits=limits) as client:
            now = trio.current_time()
            assert await client._call_retried("flaky", (), now + 5) == "ok"
            assert attempts["flaky"] == 2
            with pytest.raises(txrpc.Unavailable, match="ran, then failed"):
                await client._call_retried("failed", (), now + 5)
            assert attempts["failed"] == 1
            with pytest.raises(txrpc.Unavailable, match="never"):
                await client._call_retried("refused", (), trio.current_time() + 5)
            assert attempts["refused"] == 1 + limits.retries_max
            started = trio.current_time()
            with pytest.raises(DeadlinePassed):
                await client._call_retried("sleep", (30,), started + 0.3)
            assert 0.3 <= trio.current_time() - started < 2
            # A backoff that would outlast the deadline ends at the deadline.
            attempts["refused"] = 0
            slow = txrpc.Limits(reconnect_backoff_s=10, reconnect_backoff_max_s=10)
            async with txrpc.connect("127.0.0.1", server.port, limits=slow) as patient:
                started = trio.current_time()
                with pytest.raises(DeadlinePassed):
                    await patient._call_retried("refused", (), started + 0.3)
                assert 0.3 <= trio.current_time() - started < 2 and attempts["refused"] == 1
        nursery.cancel_scope.cancel()


async def test_try_now_answers_at_once_later_or_not_now() -> None:
    """``MethodSpec.try_now``: its value is the answer (no task); ``NOT_NOW`` runs the
    method as usual; a ``Later`` is answered when settled, from another task (a value or
    an error), and not at all if the caller cancelled meanwhile."""
    import contextvars

    service = txrpc.Service()
    pending: list[txrpc.Later] = []
    ran: list[int] = []
    leaked: contextvars.ContextVar[str] = contextvars.ContextVar("leaked", default="")
    seen: list[str] = []

    async def echo(x: int) -> int:
        ran.append(x)
        seen.append(leaked.get())
        await trio.lowlevel.checkpoint()
        return -x

    def try_now(args: Any, kwargs: dict[str, Any]) -> Any:
        (x,) = args
        leaked.set(f"set by the try of {x}")  # must stay with that try
        if x == 0:
            return txrpc.NOT_NOW
        if x < 0:
            raise txrpc.InvalidArgument("negative")
        if x >= 100:
            later = txrpc.Later()
            pending.append(later)
            return later
        return x

    service.add_method(echo, name="echo").try_now = try_now
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            assert await client.echo(5) == 5 and ran == []  # answered at once, never ran
            assert await client.echo(0) == 0 and ran == [0]  # NOT_NOW: the method ran
            assert seen == [""]  # in a task that saw nothing the tries set
            with pytest.raises(txrpc.InvalidArgument, match="negative"):
                await client.echo(-1)
            results: list[Any] = []

            async def call(x: int) -> None:
                try:
                    results.append(await client.echo(x))
                except txrpc.RpcError as exc:
                    results.append(exc.code)

            async with trio.open_nursery() as calls:
                calls.start_soon(call, 100)
                calls.start_soon(call, 101)
                while len(pending) < 2:
                    await trio.sleep(0.01)
                assert results == []
                pending[0].resolve("later")
                pending[1].fail(txrpc.Unavailable("busy"))
            assert sorted(results, key=str) == sorted(["later", txrpc.Code.UNAVAILABLE], key=str)
            with trio.move_on_after(0.2):
                await client.echo(102)  # cancelled by the caller before it is settled
            pending[2].resolve("too late")  # dropped
            with pytest.raises(RuntimeError):
                pending[2].resolve("twice")
            assert await client.echo(7) == 7  # the connection serves on
            (conn,) = server._connections
            assert not conn.later and not conn.conn.inflight
        nursery.cancel_scope.cancel()


async def test_a_nearer_call_deadline_wakes_the_connection_s_timer(
    served: tuple[txrpc.Server, dict[str, Any]],
) -> None:
    """The timer sleeps until the earliest deadline it knows; a call with a nearer one
    (a short call after a long one) must wake it, or it would end 30 s late."""
    from txrpc._client import DeadlinePassed

    server, _ = served
    async with txrpc.connect("127.0.0.1", server.port) as client, trio.open_nursery() as nursery:
        nursery.start_soon(client._call_once, "sleep", (30,), {}, {}, trio.current_time() + 60)
        await trio.sleep(0.05)
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(DeadlinePassed):
            await client._call_once("sleep", (30,), {}, {}, started + 0.2)
        assert trio.current_time() - started < 2
        nursery.cancel_scope.cancel()


async def test_a_call_deadline_wins_over_the_server_s_answer_to_it() -> None:
    """The server's deadline is the caller's plus the transit, so a caller stalled past
    its deadline can find the server's DEADLINE_EXCEEDED already in its socket when it
    wakes; the caller is told DeadlinePassed all the same, as a cancel scope's deadline
    (processed before any task runs) would have. (Found by review: the transaction
    treated the raw DEADLINE_EXCEEDED as a failure it does not retry.)"""
    import threading
    import time

    from txrpc._client import DeadlinePassed

    service, _ = make_service()
    ports: list[int] = []
    ready, stop = threading.Event(), threading.Event()

    def serve() -> None:  # the server in its own thread: it answers while the caller stalls
        async def main() -> None:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
                ports.append(server.port)
                ready.set()
                while not stop.is_set():
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

        trio.run(main)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        async with txrpc.connect("127.0.0.1", ports[0]) as client:
            for _ in range(12):  # (which of the two a loop round serves first is random)
                deadline = trio.current_time() + 0.05

                async def stall(deadline: float = deadline) -> None:
                    await trio.sleep_until(deadline - 0.005)
                    time.sleep(0.04)  # busy across the deadline: the server's answer arrives

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stall)
                    with pytest.raises(DeadlinePassed):
                        await client._call_once("sleep", (5,), {}, {}, deadline)
    finally:
        stop.set()
        thread.join(10)


async def test_a_passed_call_deadline_sends_nothing(served: tuple[txrpc.Server, dict[str, Any]]) -> None:
    from txrpc._client import DeadlinePassed

    server, _ = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        assert await client.add(1, 1) == 2  # connected
        started_before = server.calls_started
        with pytest.raises(DeadlinePassed):
            await client._call_once("add", (1, 2), {}, {}, trio.current_time() - 1)
        assert await client.add(2, 2) == 4
        assert server.calls_started == started_before + 1  # only the add after it ran


async def test_answered_calls_do_not_pile_up_in_the_deadline_heap(
    served: tuple[txrpc.Server, dict[str, Any]],
) -> None:
    """A call's deadline entry is not looked for when its answer comes (that would cost
    a search per call): the heap is rebuilt from the waiting calls once it holds far
    more entries than there are. Bounded, whatever the rate and the deadlines' length."""
    from txrpc._timers import REBUILD_SLACK

    server, _ = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        far = trio.current_time() + 600
        for i in range(3 * REBUILD_SLACK):
            assert await client._call_once("add", (i, 1), {}, {}, far) == i + 1
        channel = client._channel
        assert channel is not None
        assert len(channel.timer.heap) <= 2 * 1 + REBUILD_SLACK + 1  # (one call waiting at each rebuild)


async def test_timeout_option_raises_deadline_exceeded(served: tuple[txrpc.Server, dict[str, Any]]) -> None:
    server, seen = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        with pytest.raises(txrpc.DeadlineExceeded):
            await client.options(timeout=0.2).sleep(30)
        with trio.fail_after(5):
            await seen["cancelled"].wait()
        assert await client.options(timeout=5).sleep(0) == "slept"


async def test_cancelled_caller_cancels_handler(served: tuple[txrpc.Server, dict[str, Any]]) -> None:
    server, seen = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.sleep, 30)
                await trio.sleep(0.1)
                scope.cancel()
        assert math.isinf(seen["deadlines"][-1])  # no deadline was set: cancel, not timeout
        with trio.fail_after(5):
            await seen["cancelled"].wait()
        assert seen["running"] == 0


async def test_server_side_deadline_expiry_answers_deadline_exceeded(
    served: tuple[txrpc.Server, dict[str, Any]],
) -> None:
    """A raw peer that does not cancel still gets DEADLINE_EXCEEDED when its time is up."""
    server, seen = served
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    conn = wire.Connection(wire.Role.CLIENT)
    await stream.send_all(conn.send_hello())
    while not conn.is_open:
        conn.receive_data(await stream.receive_some(65536))
    await stream.send_all(conn.send_call(conn.next_call_id(), "sleep", [30], deadline_s=0.2))
    events: list[Any] = []
    with trio.fail_after(5):
        while not any(isinstance(e, wire.Error) for e in events):
            events += conn.receive_data(await stream.receive_some(65536))
    error = next(e for e in events if isinstance(e, wire.Error))
    assert error.code == txrpc.Code.DEADLINE_EXCEEDED
    assert seen["cancelled"].is_set()
    await stream.aclose()


async def test_deadline_propagates_across_three_hops() -> None:
    leaf_seen: list[float] = []
    leaf = txrpc.Service("leaf")

    @leaf.method
    async def work() -> float:
        remaining = txrpc.current_call().remaining_s()
        leaf_seen.append(remaining)
        return remaining

    async with trio.open_nursery() as nursery:
        leaf_server = await nursery.start(txrpc.Server(leaf).serve_tcp, "127.0.0.1", 0)
        middle = txrpc.Service("middle")

        @middle.method
        async def work() -> float:
            async with txrpc.connect("127.0.0.1", leaf_server.port) as downstream:
                return float(await downstream.leaf.work())

        middle_server = await nursery.start(txrpc.Server(middle).serve_tcp, "127.0.0.1", 0)
        front = txrpc.Service("front")

        @front.method
        async def work() -> float:  # noqa: F811
            async with txrpc.connect("127.0.0.1", middle_server.port) as downstream:
                return float(await downstream.middle.work())

        front_server = await nursery.start(txrpc.Server(front).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", front_server.port) as client:
            with trio.fail_after(3):
                remaining = await client.front.work()
            # Without a deadline the leaf would see inf; it saw what remained of our 3 s.
            assert 1.0 < remaining < 3.0
            assert leaf_seen == [remaining]
        for server in (front_server, middle_server, leaf_server):
            await server.shutdown()


async def test_error_codes_and_handler_exceptions(served: tuple[txrpc.Server, dict[str, Any]]) -> None:
    server, _ = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        with pytest.raises(txrpc.Internal, match="ValueError: bad value") as internal:
            await client.fail("value")
        assert internal.value.code == txrpc.Code.INTERNAL
        with pytest.raises(txrpc.NotFound) as not_found:
            await client.fail("not_found")
        assert not_found.value.details == {"account": "alice"}
        assert not_found.value.message == "no such account"
        with pytest.raises(txrpc.Aborted, match="conflict"):
            await client.fail("conflict")
        # A TypeError raised inside a handler with the right arity is INTERNAL, not INVALID_ARGUMENT.
        with pytest.raises(txrpc.Internal, match="TypeError"):
            await client.fail("type")
        with pytest.raises(txrpc.Unimplemented, match="nope"):
            await client.nope()
        with pytest.raises(txrpc.InvalidArgument, match="missing a required argument"):
            await client.add(1)
        with pytest.raises(txrpc.InvalidArgument, match="too many positional"):
            await client.add(1, 2, 3)
        with pytest.raises(txrpc.InvalidArgument, match="unexpected keyword"):
            await client.greet("x", colour="red")
        with pytest.raises(txrpc.InvalidArgument):
            await client.mul(1)  # the inline (plain function) path checks arity too
        with pytest.raises(txrpc.Internal, match="CBOR"):
            await client.unencodable()
        with pytest.raises(TypeError, match="cannot be sent"):
            await client.add(object(), 1)
        assert await client.add(2, 2) == 4  # the connection survived all of it


async def test_every_error_code_round_trips() -> None:
    svc = txrpc.Service()
    classes = {cls.code: cls for cls in txrpc.RpcError._by_code.values()}

    @svc.method
    async def raise_code(code: int) -> None:
        raise classes[txrpc.Code(code)](f"raised {code}", details={"n": code})

    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(svc).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            for code, cls in sorted(classes.items()):
                with pytest.raises(cls) as info:
                    await client.options(retries_max=0).raise_code(int(code))
                assert info.value.code == code
                assert info.value.details == {"n": int(code)}
        await server.shutdown()


async def test_metadata_and_call_context(served: tuple[txrpc.Server, dict[str, Any]]) -> None:
    server, _ = served
    async with txrpc.connect("127.0.0.1", server.port, metadata={"tenant": "t1"}) as client:
        info = await client.options(metadata={"trace_id": "abc"}).whoami()
        assert info["method"] == "whoami"
        assert info["metadata"] == {"tenant": "t1", "trace_id": "abc"}
        assert info["peer"].startswith("127.0.0.1:")


async def test_graceful_shutdown_drains_in_flight_calls() -> None:
    service, _ = make_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        port = server.port
        async with txrpc.connect("127.0.0.1", port) as client:
            results: list[str] = []

            async def slow() -> None:
                results.append(await client.sleep(0.3))

            async with trio.open_nursery() as calls:
                for _ in range(5):
                    calls.start_soon(slow)
                await trio.sleep(0.1)
                with trio.fail_after(5):
                    await server.shutdown(grace_s=5)
            assert results == ["slept"] * 5
        # Not listening any more.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


async def test_shutdown_grace_expiry_cancels_and_reports_unavailable() -> None:
    service, seen = make_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            outcome: list[BaseException] = []

            async def stuck() -> None:
                try:
                    await client.options(retries_max=0).sleep(60)
                except txrpc.RpcError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as calls:
                calls.start_soon(stuck)
                await trio.sleep(0.1)
                started = trio.current_time()
                await server.shutdown(grace_s=0.3)
                assert trio.current_time() - started < 3
            assert seen["cancelled"].is_set()
            assert len(outcome) == 1 and isinstance(outcome[0], txrpc.Unavailable)


async def test_client_respects_calls_inflight_max() -> None:
    service, seen = make_service()
    limits = txrpc.Limits(calls_inflight_max=4)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service, limits=limits).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as client:
            with trio.fail_after(10):
                async with trio.open_nursery() as calls:
                    for _ in range(20):
                        calls.start_soon(client.sleep, 0.05)
        assert seen["running_max"] == 4  # queued at the client, never refused, never above the bound
        await server.shutdown()


async def test_connections_max_refuses_with_a_clear_error() -> None:
    service, _ = make_service()
    limits = txrpc.Limits(connections_max=2)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service, limits=limits).serve_tcp, "127.0.0.1", 0)
        async with txrpc.connect("127.0.0.1", server.port) as a, txrpc.connect("127.0.0.1", server.port) as b:
            assert await a.add(1, 1) == 2 and await b.add(2, 2) == 4
            third = txrpc.connect("127.0.0.1", server.port, limits=txrpc.Limits(retries_max=0))
            with pytest.raises(txrpc.Unavailable, match="connections_max"):
                async with third:
                    pass
            assert await a.add(3, 3) == 6
        await server.shutdown()


async def test_idle_connections_are_closed_and_clients_reconnect() -> None:
    service, _ = make_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            txrpc.Server(service, limits=txrpc.Limits(idle_timeout_s=0.3)).serve_tcp, "127.0.0.1", 0
        )
        async with txrpc.connect("127.0.0.1", server.port) as client:
            assert await client.add(1, 2) == 3
            with trio.fail_after(5):
                while server.connection_count:
                    await trio.sleep(0.05)
            assert await client.add(2, 3) == 5  # a new connection, transparently
        await server.shutdown()


async def test_the_idle_timeout_counts_from_the_last_read_never_sooner() -> None:
    """The server moves its idle deadline only when it comes nearer than idle_timeout_s
    (not on every read): a connection is still closed no sooner than idle_timeout_s after
    its last read, and not much later (at most 1/16 of it, plus scheduling here)."""
    service, _ = make_service()
    idle_s = 0.8
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            txrpc.Server(service, limits=txrpc.Limits(idle_timeout_s=idle_s)).serve_tcp, "127.0.0.1", 0
        )
        async with txrpc.connect("127.0.0.1", server.port) as client:
            for i in range(30):  # reads closer together than idle_s / 16: most move nothing
                await trio.sleep(0.01)
                # Taken before the call is sent, so no later than the server's last read:
                # closed_after below can only over-count the idle time, never under-count it.
                last_read = trio.current_time()
                assert await client.add(i, 1) == i + 1
            with trio.fail_after(5):
                while server.connection_count:
                    await trio.sleep(0.01)
            closed_after = trio.current_time() - last_read
            assert idle_s <= closed_after <= idle_s * (1 + 1 / 16) + 0.5, closed_after
        await server.shutdown()


async def test_keepalive_pings_keep_an_idle_connection_open() -> None:
    service, _ = make_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            txrpc.Server(service, limits=txrpc.Limits(idle_timeout_s=1.0)).serve_tcp, "127.0.0.1", 0
        )
        # Pings every ~0.2 s (silent for 0.1 s, seen on 0.1 s ticks) against a 1 s idle
        # timeout: a stall of the machine would have to last ~0.8 s to close it.
        limits = txrpc.Limits(keepalive_interval_s=0.1, keepalive_timeout_s=1)
        async with txrpc.connect("127.0.0.1", server.port, limits=limits) as client:
            assert await client.add(1, 2) == 3
            await trio.sleep(2.5)
            assert server.connection_count == 1
            assert await client.add(2, 3) == 5
        await server.shutdown()


async def test_reconnects_after_the_server_restarts() -> None:
    service, _ = make_service()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", 0)
        port = server.port
        async with txrpc.connect("127.0.0.1", port) as client:
            assert await client.add(1, 2) == 3
            failed: list[BaseException] = []

            async def in_flight() -> None:
                try:
                    await client.options(retries_max=0).sleep(30)
                except txrpc.Unavailable as exc:
                    failed.append(exc)

            async with trio.open_nursery() as calls:
                calls.start_soon(in_flight)
                await trio.sleep(0.1)
                await server.shutdown(grace_s=0)
            assert len(failed) == 1  # an in-flight call fails with Unavailable, never hangs
            server = await nursery.start(txrpc.Server(service).serve_tcp, "127.0.0.1", port)
            with trio.fail_after(10):
                assert await client.add(5, 5) == 10
        await server.shutdown()


async def test_connect_failure_is_unavailable_with_a_clear_message() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(txrpc.Unavailable, match=f"cannot connect to 127.0.0.1:{port}"):
            async with txrpc.connect("127.0.0.1", port, limits=txrpc.Limits(retries_max=0)):
                pass


async def test_oversized_argument_is_refused_before_sending(
    served: tuple[txrpc.Server, dict[str, Any]],
) -> None:
    server, _ = served
    limits = txrpc.Limits(frame_bytes_max=1024)
    async with txrpc.connect("127.0.0.1", server.port, limits=limits) as client:
        with pytest.raises(txrpc.ProtocolError, match="frame_bytes_max"):
            await client.add(b"x" * 2000, b"")
        assert await client.add(b"x" * 100, b"") == b"x" * 100


async def test_oversized_result_is_resource_exhausted() -> None:
    svc = txrpc.Service()

    @svc.method
    async def big(n: int) -> bytes:
        return b"x" * n

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            txrpc.Server(svc, limits=txrpc.Limits(frame_bytes_max=4096)).serve_tcp, "127.0.0.1", 0
        )
        async with txrpc.connect("127.0.0.1", server.port) as client:
            with pytest.raises(txrpc.ResourceExhausted, match="too large"):
                await client.big(10_000)
            assert await client.big(10) == b"x" * 10
        await server.shutdown()


async def test_non_string_map_keys_fail_locally_not_the_connection(
    served: tuple[txrpc.Server, dict[str, Any]],
) -> None:
    """The wire refuses non-string map keys (hash-flooding defence); the sender learns
    it for its own call and the connection keeps working."""
    server, _ = served
    async with txrpc.connect("127.0.0.1", server.port) as client:
        with pytest.raises(TypeError, match="map keys must be text or byte strings"):
            await client.add({1: "a"}, {})
        assert await client.add([{"a": 1}], [{b"b": 2}]) == [{"a": 1}, {b"b": 2}]
        assert await client.add(1, 2) == 3
