"""The simulated network: each link fault does what it says, deterministically."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from txrpc._codec import frame
from txrpc.testing import LinkFaults, SimNetwork


def run(fn):  # type: ignore[no-untyped-def]
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def pair(net: SimNetwork, client: str = "a", server: str = "b"):  # type: ignore[no-untyped-def]
    listener = net.listen(server, "10.0.0.2", 7000)
    client_stream = await net.connect(client, "10.0.0.2", 7000)
    server_stream = await listener.accept()
    return client_stream, server_stream


async def read_frames(stream, count: int, timeout_s: float = 5.0) -> list[bytes]:  # type: ignore[no-untyped-def]
    buffer = b""
    frames: list[bytes] = []
    with trio.move_on_after(timeout_s):
        while len(frames) < count:
            data = await stream.receive_some(65536)
            if not data:
                break
            buffer += data
            while len(buffer) >= 4 and len(buffer) >= 4 + int.from_bytes(buffer[:4], "big"):
                end = 4 + int.from_bytes(buffer[:4], "big")
                frames.append(buffer[4:end])
                buffer = buffer[end:]
    return frames


def test_frames_arrive_in_order_with_latency() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(1), default=LinkFaults(delay_s=0.01, jitter_s=0.0))
        c, s = await pair(net)
        start = trio.current_time()
        await c.send_all(b"".join(frame(bytes([i])) for i in range(20)))
        frames = await read_frames(s, 20)
        assert frames == [bytes([i]) for i in range(20)]
        assert trio.current_time() - start == pytest.approx(0.01, abs=1e-6)

    run(main)


def test_drop_loses_frames_but_keeps_the_connection() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(2))
        net.link("a", "b").drop_p = 0.5
        c, s = await pair(net)
        await c.send_all(b"".join(frame(i.to_bytes(2, "big")) for i in range(200)))
        await c.aclose()
        frames = await read_frames(s, 200)
        assert 50 < len(frames) < 150, len(frames)
        assert frames == sorted(frames)  # survivors keep their order
        assert net.stats["dropped"] == 200 - len(frames)

    run(main)


def test_duplicate_and_reorder() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(3))
        link = net.link("a", "b")
        link.duplicate_p = 0.3
        link.reorder_p = 0.5
        link.jitter_s = 0.01
        c, s = await pair(net)
        sent = [i.to_bytes(2, "big") for i in range(100)]
        await c.send_all(b"".join(frame(x) for x in sent))
        await c.aclose()
        frames = await read_frames(s, 1000)
        assert len(frames) == 100 + net.stats["duplicated"] > 100
        assert set(frames) == set(sent)
        assert frames != sorted(frames)

    run(main)


def test_reset_breaks_both_ends() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(4))
        net.link("a", "b").reset_p = 1.0
        c, s = await pair(net)
        await c.send_all(frame(b"x"))
        with pytest.raises(trio.BrokenResourceError):
            await s.receive_some(10)
        with pytest.raises(trio.BrokenResourceError):
            await c.send_all(frame(b"y"))

    run(main)


def test_partition_blackholes_and_refuses_new_connections() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(5), connect_timeout_s=1.0)
        c, s = await pair(net)
        net.partition("a", "b", one_way=True)
        await c.send_all(frame(b"lost"))
        await s.send_all(frame(b"back"))  # the other direction still works
        assert await read_frames(c, 1) == [b"back"]
        assert await read_frames(s, 1, timeout_s=2.0) == []
        start = trio.current_time()
        with pytest.raises(OSError):
            await net.connect("a", "10.0.0.2", 7000)
        assert trio.current_time() - start == pytest.approx(1.0)
        net.heal()
        await c.send_all(frame(b"after"))
        assert await read_frames(s, 1) == [b"after"]

    run(main)


def test_slow_writes_slice_frames_but_preserve_bytes() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(6))
        net.link("a", "b").slice_p = 1.0
        net.link("a", "b").delay_s = 0.001
        c, s = await pair(net)
        payload = bytes(range(256)) * 4
        await c.send_all(frame(payload))
        pieces = []
        while sum(len(p) for p in pieces) < len(payload) + 4:
            pieces.append(await s.receive_some(65536))
        assert len(pieces) >= 2
        assert b"".join(pieces)[4:] == payload

    run(main)


def test_crash_resets_connections_and_closes_listeners() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(7))
        c, _s = await pair(net)
        net.crash("b")
        with pytest.raises(trio.BrokenResourceError):
            await c.receive_some(10)
        with pytest.raises(OSError, match="refused"):
            await net.connect("a", "10.0.0.2", 7000)

    run(main)


def test_pause_holds_frames_until_resume() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(8))
        c, s = await pair(net)
        net.pause("b", until=trio.current_time() + 2.0)
        start = trio.current_time()
        await c.send_all(frame(b"held"))
        assert await read_frames(s, 1) == [b"held"]
        assert trio.current_time() - start == pytest.approx(2.0)

    run(main)


def test_same_seed_same_faults() -> None:
    def trace(seed: int) -> list[bytes]:
        async def main() -> list[bytes]:
            net = SimNetwork(random.Random(seed))
            link = net.link("a", "b")
            link.drop_p, link.duplicate_p, link.reorder_p, link.jitter_s = 0.2, 0.2, 0.3, 0.01
            c, s = await pair(net)
            await c.send_all(b"".join(frame(i.to_bytes(2, "big")) for i in range(100)))
            await c.aclose()
            return await read_frames(s, 1000)

        return run(main)  # type: ignore[no-any-return]

    assert trace(11) == trace(11)
    assert trace(11) != trace(12)


def test_a_read_returns_everything_delivered_and_wakes_at_the_delivery_time() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(9), default=LinkFaults(delay_s=0.01, jitter_s=0.0))
        c, s = await pair(net)
        start = trio.current_time()
        for i in range(5):  # five frames, one delivery time: one read holds them all (as TCP's)
            await c.send_all(frame(bytes([i])))
        data = await s.receive_some(65536)
        assert data == b"".join(frame(bytes([i])) for i in range(5))
        assert trio.current_time() - start == pytest.approx(0.01, abs=1e-6)
        # send_nowait (the outbox's direct write) goes through the same faults and clock.
        assert c.send_nowait(frame(b"now")) == len(frame(b"now"))
        assert await s.receive_some(65536) == frame(b"now")
        assert trio.current_time() - start == pytest.approx(0.02, abs=1e-6)
        # A reader parked on an idle connection is cancellable and leaves no trace.
        with trio.move_on_after(0.5):
            await s.receive_some(65536)
        await c.send_all(frame(b"after"))
        assert await s.receive_some(65536) == frame(b"after")
        net.crash("a")
        assert c.send_nowait(frame(b"lost")) == 0  # reset: the writer's send_all reports it
        with pytest.raises(trio.BrokenResourceError):
            await s.receive_some(65536)

    run(main)


def test_frames_in_flight_at_the_end_of_a_run_arrive_in_the_next_run() -> None:
    """One network used by two trio runs: a reader in the second run gets what was sent
    in the first, though nothing is sent in the second (its clock starts for the reader)."""
    net = SimNetwork(random.Random(10), default=LinkFaults(delay_s=0.01, jitter_s=0.0))
    streams = {}

    async def first() -> None:
        streams["c"], streams["s"] = await pair(net)
        await streams["c"].send_all(frame(b"hello"))  # still in flight when this run ends

    async def second() -> bytes:
        with trio.fail_after(5):
            return bytes(await streams["s"].receive_some(65536))

    run(first)
    assert run(second) == frame(b"hello")


def test_a_cancelled_read_loses_nothing() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(11), default=LinkFaults(delay_s=0.01, jitter_s=0.0))
        c, s = await pair(net)
        await c.send_all(b"".join(frame(bytes([i])) for i in range(3)))
        await trio.sleep(0.02)  # delivered, not read
        with trio.CancelScope() as scope:
            scope.cancel()
            await s.receive_some(65536)  # cancelled at its checkpoint: takes nothing
        assert await read_frames(s, 3) == [bytes([i]) for i in range(3)]

    run(main)


def test_slices_arrive_apart_even_without_latency() -> None:
    async def main() -> None:
        net = SimNetwork(random.Random(12), default=LinkFaults(delay_s=0.0, jitter_s=0.0))
        net.link("a", "b").slice_p = 1.0
        c, s = await pair(net)
        await c.send_all(frame(b"0123456789"))
        pieces = []
        while sum(map(len, pieces)) < len(frame(b"0123456789")):
            pieces.append(bytes(await s.receive_some(65536)))
        assert len(pieces) >= 2 and b"".join(pieces) == frame(b"0123456789")

    run(main)
