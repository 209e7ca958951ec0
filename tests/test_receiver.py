"""txrpc._receiver.Receiver on real loopback TCP: what it reads, where streams end or
break, cancellation, and the fallback for streams that are not plain sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from txrpc._receiver import Receiver


@asynccontextmanager
async def _connected() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream, Receiver]]:
    """A loopback TCP connection (client side, server side) and a Receiver on the server
    side; both sides closed at the end (closing twice is harmless)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    try:
        yield client, server, Receiver(server)
    finally:
        await client.aclose()
        await server.aclose()


async def test_reads_what_was_sent_in_pieces_no_larger_than_asked() -> None:
    async with _connected() as (client, _server, receiver):
        payload = bytes(range(256)) * 40  # 10,240 bytes
        await client.send_all(payload)
        received = b""
        with trio.fail_after(5):
            while len(received) < len(payload):
                piece = await receiver.receive(1000)  # more is waiting after a full read
                assert 0 < len(piece) <= 1000
                received += piece
        assert received == payload
        await client.send_all(b"later")  # after a read that emptied the socket: waits, then reads
        with trio.fail_after(5):
            assert await receiver.receive(1000) == b"later"
        await client.aclose()
        with trio.fail_after(5):
            assert await receiver.receive(1000) == b""  # the end of the stream


async def test_after_a_full_read_an_empty_socket_is_waited_on_and_every_receive_is_a_checkpoint() -> None:
    async with _connected() as (client, _server, receiver):
        await client.send_all(b"x" * 300)
        with trio.fail_after(5):
            with trio.testing.assert_checkpoints():
                assert await receiver.receive(100) == b"x" * 100  # first read: waited for readability
            with trio.testing.assert_checkpoints():
                assert await receiver.receive(100) == b"x" * 100  # a full read before: read at once
            with trio.testing.assert_checkpoints():
                assert await receiver.receive(100) == b"x" * 100
            # A full read before, but nothing left: the read finds the socket empty and waits.
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def receive() -> None:
                    got.append(await receiver.receive(100))

                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                await client.send_all(b"late")
            assert got == [b"late"]
        with pytest.raises(ValueError):
            await receiver.receive(0)


async def test_a_cancelled_receive_after_a_full_read_leaves_the_data_for_the_next() -> None:
    async with _connected() as (client, _server, receiver):
        await client.send_all(b"y" * 150)
        with trio.fail_after(5):
            assert await receiver.receive(100) == b"y" * 100
            with trio.CancelScope() as scope:
                scope.cancel()
                await receiver.receive(100)  # cancelled at its checkpoint, before reading
            assert await receiver.receive(100) == b"y" * 50


async def test_a_receive_waits_for_data_and_can_be_cancelled() -> None:
    async with _connected() as (client, _server, receiver):
        with trio.move_on_after(0.05) as scope:
            await receiver.receive(100)
        assert scope.cancelled_caught
        await client.send_all(b"x")
        with trio.fail_after(5):
            assert await receiver.receive(100) == b"x"  # the cancelled wait took nothing


async def test_closing_the_stream_here_ends_a_waiting_receive_and_later_ones() -> None:
    async with _connected() as (_client, server, receiver):
        failures: list[BaseException] = []

        async def receive() -> None:
            try:
                await receiver.receive(100)
            except trio.ClosedResourceError as exc:
                failures.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                await server.aclose()
        assert len(failures) == 1
        with pytest.raises(trio.ClosedResourceError):
            await receiver.receive(100)


async def test_a_reset_connection_is_a_broken_resource() -> None:
    async with _connected() as (client, _server, receiver):
        # SO_LINGER 0: closing sends RST instead of FIN.
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await client.aclose()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await receiver.receive(100)


async def test_other_streams_are_read_through_receive_some() -> None:
    left, right = trio.testing.memory_stream_pair()
    receiver = Receiver(right)
    await left.send_all(b"memory")
    with trio.fail_after(5):
        assert await receiver.receive(100) == b"memory"
