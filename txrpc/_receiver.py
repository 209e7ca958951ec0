"""Reading one stream: a plain TCP socket is read directly.

trio's ``SocketStream.receive_some`` first tries the read, and on a socket with nothing
in it (the usual case for a connection that carries small messages: the previous read
took everything) that read fails with ``EAGAIN``; trio then waits for readability and
reads again. Each receive pays a failing syscall, the exception, two context managers
and a scheduler round. :class:`Receiver` remembers whether its last read emptied the
socket (it returned fewer bytes than asked for) and then waits for readability first.
"""

from __future__ import annotations

import os

import trio


class Receiver:
    """``await receive(max_bytes)`` -> the bytes read (``b""`` at the end of the stream),
    as ``stream.receive_some``; one task reads at a time. Errors are trio's:
    ``trio.ClosedResourceError`` once the stream was closed here,
    ``trio.BrokenResourceError`` when the connection broke. Streams other than a plain
    ``trio.SocketStream`` (TLS, the simulator's) are read through ``receive_some``."""

    __slots__ = ("_drained", "_socket", "_stream")

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._socket = stream.socket if type(stream) is trio.SocketStream else None
        self._drained = True  # the last read took everything there was (or none was made)

    async def receive(self, max_bytes: int) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")  # (0 would read b"": the end of the stream)
        sock = self._socket
        if sock is None:
            return bytes(await self._stream.receive_some(max_bytes))
        wait = self._drained
        if not wait:
            await trio.lowlevel.checkpoint()  # (every receive is a checkpoint, as trio's)
        while True:
            fd = sock.fileno()  # each time: -1 once closed (a cached number could be reused)
            if fd < 0:
                raise trio.ClosedResourceError("the stream was closed")
            if wait:
                await trio.lowlevel.wait_readable(fd)  # (closing the stream here wakes it, raising)
                wait = False
                continue
            try:
                data = os.read(fd, max_bytes)
            except (BlockingIOError, InterruptedError):
                wait = True  # (a wake-up with nothing to read)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            self._drained = len(data) < max_bytes
            return data
