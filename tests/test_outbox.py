"""The outbox's direct write (``write_now``): a plain socket takes a small batch at once,
without the writer task; what the kernel does not take stays queued, in order."""

from __future__ import annotations

import trio
import trio.testing

from txrpc._outbox import Outbox


async def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listeners[0].accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    return client, accepted[0]


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    with trio.fail_after(10):
        while len(data) < size:
            data += await stream.receive_some(size - len(data))
    return bytes(data)


async def test_write_now_sends_without_the_writer_task() -> None:
    a, b = await socket_pair()
    outbox = Outbox(a, buffer_bytes_max=1 << 20)
    outbox.put_nowait(b"hello ")
    outbox.put_nowait(b"world")
    outbox.write_now()  # no writer task is running at all
    assert outbox.queued_bytes == 0
    assert await receive_exactly(b, 11) == b"hello world"
    await a.aclose()
    outbox.put_nowait(b"late")
    outbox.write_now()  # closed: nothing is written, nothing raised; the writer reports it
    assert outbox.queued_bytes == 4
    await b.aclose()


async def test_put_nowait_with_write_now_writes_at_once_and_wakes_the_writer_only_for_a_rest() -> None:
    a, b = await socket_pair()
    outbox = Outbox(a, buffer_bytes_max=1 << 20)

    def writer_parked() -> bool:
        return outbox._writer_lot.statistics().tasks_waiting == 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        await trio.testing.wait_all_tasks_blocked()
        assert writer_parked()
        outbox.put_nowait(b"ping", write_now=True)
        assert outbox.queued_bytes == 0 and writer_parked()  # written here: the writer sleeps on
        assert await receive_exactly(b, 4) == b"ping"
        outbox.put_nowait(b"x" * 100_000, write_now=True)  # a large batch: the writer's
        assert not writer_parked()
        assert await receive_exactly(b, 100_000) == b"x" * 100_000
        outbox.close_after_flush()
    await a.aclose()
    await b.aclose()


async def test_what_the_kernel_does_not_take_is_left_to_the_writer_in_order() -> None:
    a, b = await socket_pair()
    outbox = Outbox(a, buffer_bytes_max=64 << 20)
    sent = bytearray()
    # Fill the socket buffers (the peer is not reading) until a direct write is partial.
    for i in range(100_000):
        piece = bytes([i % 251]) * 4000
        outbox.put_nowait(piece)
        sent += piece
        outbox.write_now()
        if outbox.queued_bytes:
            break
    assert outbox.queued_bytes, "the kernel never pushed back"
    for i in range(3):  # more behind what is left
        outbox.put_nowait(bytes([i]) * 1000)
        sent += bytes([i]) * 1000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        received = await receive_exactly(b, len(sent))
        outbox.close_after_flush()
    assert received == bytes(sent)
    await a.aclose()
    await b.aclose()


async def test_write_now_leaves_other_streams_and_large_batches_to_the_writer() -> None:
    left, _right = trio.testing.memory_stream_pair()
    outbox = Outbox(left, buffer_bytes_max=1 << 20)
    outbox.put_nowait(b"x")
    outbox.write_now()
    assert outbox.queued_bytes == 1  # not a plain socket: only the writer writes
    a, b = await socket_pair()
    outbox = Outbox(a, buffer_bytes_max=1 << 20)
    outbox.put_nowait(b"y" * (64 * 1024))
    outbox.write_now()
    assert outbox.queued_bytes == 64 * 1024  # large: the writer sends it (no copy, no hurry)
    await a.aclose()
    await b.aclose()


class NowaitStream(trio.abc.SendStream):
    """A stream with ``send_nowait`` (as the simulator's): takes up to ``room`` bytes at
    once; ``send_all`` (the writer task) records what it sends."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.taken = bytearray()
        self.nowait_calls = 0
        self.sent_by_writer = bytearray()

    def send_nowait(self, data: bytes) -> int:
        self.nowait_calls += 1
        if len(data) > self.room:
            return 0
        self.room -= len(data)
        self.taken += data
        return len(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.taken += data
        self.sent_by_writer += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_a_stream_with_send_nowait_takes_frames_without_the_writer_task() -> None:
    stream = NowaitStream(room=10)
    outbox = Outbox(stream, buffer_bytes_max=1 << 20)
    outbox.put_nowait(b"hello")  # no writer task runs at all
    assert bytes(stream.taken) == b"hello" and outbox.queued_bytes == 0
    outbox.put_nowait(b"world!")  # no room: queued for the writer
    assert outbox.queued_bytes == 6
    calls = stream.nowait_calls
    outbox.put_nowait(b"x")  # something is queued ahead of it: it must not overtake
    assert stream.nowait_calls == calls and outbox.queued_bytes == 7
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        outbox.close_after_flush()
    assert bytes(stream.taken) == b"helloworld!x"  # in order
    assert bytes(stream.sent_by_writer) == b"world!x"
