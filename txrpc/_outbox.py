"""Write coalescing for one stream: many producers, one writer, one ``send_all`` per batch."""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

LARGE_CHUNK_BYTES = 64 * 1024


class Outbox:
    """Frames queued by any task, written by :meth:`run` in batches.

    ``put_nowait`` never blocks (use it for small control frames and when the caller
    cannot await); ``put`` waits while more than ``buffer_bytes_max`` are queued, so a
    slow reader applies backpressure instead of growing memory without bound.
    With ``send_stall_timeout_s``, one ``send_all`` that takes longer (the peer stopped
    reading) breaks the outbox (``broken`` is a ``trio.TooSlowError``).
    """

    def __init__(
        self, stream: trio.abc.SendStream, buffer_bytes_max: int, send_stall_timeout_s: float | None = None
    ) -> None:
        self._stream = stream
        self._send_stall_timeout_s = send_stall_timeout_s
        self._chunks: list[bytes] = []
        self._queued_bytes = 0
        self._buffer_bytes_max = buffer_bytes_max
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._space_lot = trio.lowlevel.ParkingLot()
        self._closing = False
        self._sending = False  # the writer is inside send_all
        # A plain TCP stream can take a small write at once, without the writer task; so
        # can a stream with a ``send_nowait(data) -> bytes taken`` (the simulator's).
        self._socket = stream.socket if type(stream) is trio.SocketStream else None
        self._send_nowait: Callable[[bytes], int] | None = getattr(stream, "send_nowait", None)
        self.broken: BaseException | None = None

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def put_nowait(self, data: bytes, write_now: bool = False) -> None:
        """Queue ``data``; with ``write_now``, then :meth:`write_now`: the writer task is
        woken only if something is left (waking it for nothing costs a task switch)."""
        if self._closing:
            return
        if self._send_nowait is not None and not self._chunks and not self._sending:
            # Writes to this stream are cheap (the simulator's): nothing is ahead of
            # this frame, so hand it over now rather than wake the writer task for it.
            written = self._send_nowait(data)
            if written == len(data):
                return
            data = data[written:]
        self._chunks.append(data)
        self._queued_bytes += len(data)
        if write_now:
            self.write_now()
        if self._writer_lot and self._chunks:
            self._writer_lot.unpark()

    def write_now(self) -> None:
        """Write what is queued from the calling task, now, if that is cheap and safe: a
        plain socket, the writer idle, a small batch. What the kernel does not take at
        once (or any error) is left to the writer task. Saves a scheduler round per
        message on an idle connection (lower latency); busy connections should keep
        to the writer, which coalesces."""
        chunks = self._chunks
        if self._sending or not chunks or self._closing or self._queued_bytes >= LARGE_CHUNK_BYTES:
            return
        if self._socket is None and self._send_nowait is None:
            return  # only the writer can write to this stream (TLS, say)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        written = self._write_direct(data)
        if written is None:
            return  # the writer meets the same error and reports it
        if written == len(data):
            chunks.clear()
            self._queued_bytes = 0
        elif written:
            chunks[:] = [data[written:]]
            self._queued_bytes = len(data) - written

    def _write_direct(self, data: bytes) -> int | None:
        """The bytes the stream took at once (a non-blocking write to the socket, or
        ``send_nowait``); None on an error, which the writer meets and reports."""
        if self._socket is not None:
            fd = self._socket.fileno()  # each time: -1 once closed (a cached number could be reused)
            if fd < 0:
                return None
            try:
                return os.write(fd, data)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError:
                return None
        assert self._send_nowait is not None
        return self._send_nowait(data)

    async def wait_for_space(self) -> None:
        """Wait until at most ``buffer_bytes_max`` are queued (returns at once if so)."""
        while self._queued_bytes > self._buffer_bytes_max and not self._closing:
            await self._space_lot.park()

    async def put(self, data: bytes) -> None:
        await self.wait_for_space()
        self.put_nowait(data)

    def close_after_flush(self) -> None:
        """Write what is queued, then stop; later puts are dropped."""
        self._closing = True
        self._space_lot.unpark_all()
        if self._writer_lot:
            self._writer_lot.unpark()

    async def _send(self, data: bytes) -> None:
        if self._socket is not None:
            # Most writes fit in the socket buffer: take that path without send_all's
            # checkpoints and the stall timer's cancel scope (the writer parks when
            # nothing is queued, so it still yields). What is left goes through send_all
            # (a view of it: a large chunk is not copied again).
            written = self._write_direct(data)
            if written == len(data):
                return
            if written:
                await self._send_all(memoryview(data)[written:])
                return
        await self._send_all(data)

    async def _send_all(self, data: bytes | memoryview) -> None:
        self._sending = True
        try:
            if self._send_stall_timeout_s is None:
                await self._stream.send_all(data)
            else:
                with trio.fail_after(self._send_stall_timeout_s):
                    await self._stream.send_all(data)
        finally:
            self._sending = False

    async def run(self) -> None:
        """The writer task: returns after :meth:`close_after_flush` once all is written.

        A broken stream is recorded in ``broken`` and ends the task quietly; the reader
        side sees the same failure.
        """
        chunks = self._chunks
        try:
            while True:
                if not chunks:
                    if self._closing:
                        return
                    await self._writer_lot.park()
                    continue
                batch = list(chunks)
                chunks.clear()
                self._queued_bytes = 0
                if self._space_lot:
                    self._space_lot.unpark_all()
                # Coalesce small frames into one send; large ones go as they are (joining
                # would copy megabytes for nothing).
                small: list[bytes] = []
                for chunk in batch:
                    if len(chunk) < LARGE_CHUNK_BYTES:
                        small.append(chunk)
                        continue
                    if small:
                        await self._send(small[0] if len(small) == 1 else b"".join(small))
                        small = []
                    await self._send(chunk)
                if small:
                    await self._send(small[0] if len(small) == 1 else b"".join(small))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError) as exc:
            self.broken = exc
            self._closing = True
            self._space_lot.unpark_all()
