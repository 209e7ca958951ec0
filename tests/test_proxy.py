"""The fault-injecting TCP proxy, over real loopback TCP: each toxic observably does what
it says, and bad settings are refused."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from txrpc.testing._proxy import FaultProxy, Toxics, open_fault_proxy


class Echo:
    """A loopback TCP echo server that remembers what it received and how."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.reads: list[int] = []
        self.connections = 0
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    self.received += data
                    self.reads.append(len(data))
                    await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


@asynccontextmanager
async def echo_behind_proxy(**kwargs: object) -> AsyncIterator[tuple[Echo, FaultProxy]]:
    echo = Echo()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo.handle, 0, host="127.0.0.1"))
        echo.port = listeners[0].socket.getsockname()[1]
        async with open_fault_proxy("127.0.0.1", echo.port, rng=random.Random(1), **kwargs) as proxy:  # type: ignore[arg-type]
            yield echo, proxy
        nursery.cancel_scope.cancel()


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


async def test_forwards_both_ways_without_toxics() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            payload = bytes(range(256)) * 400  # 100 KiB: several chunks
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                assert await receive_exactly(stream, len(payload)) == payload
        assert bytes(echo.received) == payload
        assert proxy.stats.bytes_up == proxy.stats.bytes_down == len(payload)
        assert proxy.stats.connections == 1


async def test_latency_delays_each_direction() -> None:
    async with echo_behind_proxy() as (_, proxy):
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(b"warm")
            await receive_exactly(stream, 4)
            baseline_start = trio.current_time()
            await stream.send_all(b"ping")
            await receive_exactly(stream, 4)
            baseline_s = trio.current_time() - baseline_start

            proxy.set_toxic(latency_s=0.15)
            start = trio.current_time()
            await stream.send_all(b"ping")
            await receive_exactly(stream, 4)
            elapsed_s = trio.current_time() - start
        # 0.15 s on the way in and 0.15 s on the way out; generous upper bound for a busy machine.
        assert 0.3 <= elapsed_s < 0.3 + baseline_s + 0.5, (elapsed_s, baseline_s)


async def test_jitter_keeps_byte_order() -> None:
    async with echo_behind_proxy(chunk_bytes=64) as (_, proxy):
        proxy.set_toxic(latency_s=0.01, jitter_s=0.01)
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            payload = bytes(i % 251 for i in range(20_000))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                assert await receive_exactly(stream, len(payload)) == payload


async def test_drop_closes_and_loses_the_chunk() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        proxy.set_toxic(drop_p=1.0)
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(b"lost")
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""  # closed (FIN), no data
        await trio.sleep(0.05)
        assert echo.received == b""
        assert proxy.stats.dropped == 1
        assert proxy.stats.bytes_up == 0


async def test_reset_sends_rst() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        proxy.set_toxic(reset_p=1.0)
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(b"lost")
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(100)  # ECONNRESET, not an orderly close
        assert echo.received == b""
        assert proxy.stats.resets == 1


async def test_blackhole_swallows_then_resets_on_heal() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        stream = await trio.open_tcp_stream(*proxy.address)
        await stream.send_all(b"before")
        assert await receive_exactly(stream, 6) == b"before"

        proxy.set_toxic(blackhole=True)
        await stream.send_all(b"into the void")
        with trio.move_on_after(0.5) as scope:
            await stream.receive_some(100)
        assert scope.cancelled_caught, "a black hole answers nothing"
        late = await trio.open_tcp_stream(*proxy.address)  # accepted, but never reaches the target
        await late.send_all(b"also lost")
        await trio.sleep(0.2)
        assert bytes(echo.received) == b"before"
        assert echo.connections == 1
        assert proxy.stats.blackholed_bytes == len(b"into the void") + len(b"also lost")

        proxy.heal()
        for lost in (stream, late):  # both lost data: a TCP stream cannot resume after a gap
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                await lost.receive_some(100)
            await lost.aclose()
        fresh = await trio.open_tcp_stream(*proxy.address)
        async with fresh:
            await fresh.send_all(b"after")
            assert await receive_exactly(fresh, 5) == b"after"


async def test_pause_holds_data_and_delivers_it_after() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            proxy.set_toxic(paused=True)
            await stream.send_all(b"held")
            with trio.move_on_after(0.4) as scope:
                await stream.receive_some(100)
            assert scope.cancelled_caught
            assert echo.received == b""
            healed_at = trio.current_time()
            proxy.heal()
            with trio.fail_after(5):
                assert await receive_exactly(stream, 4) == b"held"  # delayed, not lost
            assert trio.current_time() >= healed_at
        assert proxy.stats.resets == proxy.stats.dropped == 0


async def test_slicing_splits_writes() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        proxy.set_toxic(slice_bytes=10, slice_delay_s=0.005)
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            payload = bytes(range(200))
            await stream.send_all(payload)
            assert await receive_exactly(stream, len(payload)) == payload
        assert bytes(echo.received) == payload
        assert len(echo.reads) >= 10, echo.reads  # the server saw short reads
        assert max(echo.reads) <= 10


async def test_bandwidth_limits_throughput() -> None:
    async with echo_behind_proxy() as (echo, proxy):
        proxy.set_toxic(bandwidth_bytes_per_s=20_000)
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            payload = b"x" * 4_000
            start = trio.current_time()
            await stream.send_all(payload)
            with trio.fail_after(5):
                while len(echo.received) < len(payload):
                    await trio.sleep(0.001)
            elapsed_s = trio.current_time() - start
        # 4 kB at 20 kB/s takes 0.2 s to reach the server (in 0.1 s pieces: 2 kB each).
        assert 0.19 <= elapsed_s < 1.0, elapsed_s
        assert max(echo.reads) <= 2_000


async def test_connection_limit_resets_the_extra_ones() -> None:
    async with echo_behind_proxy(connections_max=2) as (_, proxy):
        held = [await trio.open_tcp_stream(*proxy.address) for _ in range(2)]
        for stream in held:
            await stream.send_all(b"hi")
            await receive_exactly(stream, 2)
        extra = await trio.open_tcp_stream(*proxy.address)
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await extra.send_all(b"hi")
            await extra.receive_some(10)
        await extra.aclose()
        assert proxy.stats.refused == 1
        assert proxy.open_connections == 2
        for stream in held:
            await stream.aclose()


async def test_target_down_is_a_reset_and_counted() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # closed again: nothing listens there
    async with open_fault_proxy("127.0.0.1", dead_port) as proxy:
        stream = await trio.open_tcp_stream(*proxy.address)
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"hi")
            await stream.receive_some(10)
        await stream.aclose()
        assert proxy.stats.connect_failures == 1


async def test_reset_connections() -> None:
    async with echo_behind_proxy() as (_, proxy):
        stream = await trio.open_tcp_stream(*proxy.address)
        await stream.send_all(b"hi")
        await receive_exactly(stream, 2)
        assert proxy.reset_connections() == 1
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await stream.receive_some(10)
        await stream.aclose()


def test_bad_settings_are_refused() -> None:
    proxy = FaultProxy("127.0.0.1", 9)
    with pytest.raises(ValueError, match=r"drop_p must be in 0\.\.1"):
        proxy.set_toxic(drop_p=1.5)
    with pytest.raises(ValueError, match=r"latency_s must be in 0\.\.60"):
        proxy.set_toxic(latency_s=-1)
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s must be an integer"):
        proxy.set_toxic(bandwidth_bytes_per_s=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blackhole must be True or False"):
        Toxics(blackhole=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        proxy.set_toxic(bogus=1)  # type: ignore[call-arg]
    assert proxy.toxics == Toxics()  # a refused change changes nothing
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("127.0.0.1", 9, listen_host="0.0.0.0")
    with pytest.raises(ValueError, match="target_port"):
        FaultProxy("127.0.0.1", 0)
    with pytest.raises(ValueError, match="connections_max"):
        FaultProxy("127.0.0.1", 9, connections_max=0)
    with pytest.raises(RuntimeError, match="not running"):
        _ = proxy.port
    assert proxy.set_toxic(latency_s=0.1, drop_p=0.5).active() == {"latency_s": 0.1, "drop_p": 0.5}
    assert proxy.set_toxic(drop_p=0).active() == {"latency_s": 0.1}
