"""A fault-injecting TCP proxy for loopback tests, with Toxiproxy-style *toxics*.

Put a :class:`FaultProxy` in front of any TCP service and point the client at the
proxy's port; then change what the proxy does to the traffic while the test runs::

    async with open_fault_proxy("127.0.0.1", server_port, rng=random.Random(7)) as proxy:
        client = await trio.open_tcp_stream(*proxy.address)
        proxy.set_toxic(latency_s=0.05, jitter_s=0.01)  # every chunk, each way
        proxy.set_toxic(drop_p=0.1)                     # 10 % of chunks: close, chunk lost
        proxy.set_toxic(blackhole=True)                 # accept and swallow
        proxy.heal()                                    # all toxics off

Toxics (:class:`Toxics`) apply to both directions of every connection through the
proxy, existing and new, from the next chunk on:

==========================  ===========================================================
``latency_s``, ``jitter_s`` each chunk is delivered ``latency_s ± jitter_s`` after it
                            arrived (order kept: TCP never reorders)
``bandwidth_bytes_per_s``   at most this many bytes per second each way, paced in
                            pieces of 0.1 s worth (0: unlimited)
``slice_bytes``,            chunks are written in slices of ``slice_bytes`` with
``slice_delay_s``           ``slice_delay_s`` between them (the peer sees short reads)
``drop_p``                  per chunk: the chunk is lost and both sides are closed (FIN)
``reset_p``                 per chunk: the chunk is lost and both sides are reset (RST)
``blackhole``               data is swallowed; new connections are accepted and never
                            reach the target. A connection that lost data this way is
                            reset when the black hole ends (a TCP stream cannot resume
                            after a gap)
``paused``                  a partition: nothing is read or delivered and new
                            connections wait before reaching the target; data already
                            read is held (bounded) and delivered after the pause
==========================  ===========================================================

Everything is bounded: connections (``connections_max``; more are reset at once),
chunk size (``chunk_bytes``) and chunks queued per direction (``queue_chunks``), so a
slow or paused side back-pressures the sender instead of growing a buffer. The proxy
listens on a loopback address only. Probabilities draw from the ``rng`` you pass
(seeded ``random.Random``); which chunk a toxic hits still depends on how the kernel
splits the byte stream, so runs over real sockets are not bit-for-bit reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import math
import random
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any, Final, Literal

import trio

__all__ = ["FaultProxy", "ProxyStats", "Toxics", "open_fault_proxy"]

LATENCY_MAX_S: Final = 60.0
SLICE_DELAY_MAX_S: Final = 1.0
CONNECTIONS_MAX_DEFAULT: Final = 256
CHUNK_BYTES_DEFAULT: Final = 16 * 1024
QUEUE_CHUNKS_DEFAULT: Final = 16
CONNECT_TIMEOUT_S_DEFAULT: Final = 5.0

_End = Literal["close", "reset"]


@dataclasses.dataclass(frozen=True, slots=True)
class Toxics:
    """What a :class:`FaultProxy` does to the traffic; the defaults do nothing.

    See the module docstring for what each field does. Raises ``ValueError`` for a value
    out of range (probabilities in 0..1, delays in 0..60 s, sizes >= 0).
    """

    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bytes_per_s: int = 0
    slice_bytes: int = 0
    slice_delay_s: float = 0.0
    drop_p: float = 0.0
    reset_p: float = 0.0
    blackhole: bool = False
    paused: bool = False

    def __post_init__(self) -> None:
        for name in ("latency_s", "jitter_s"):
            _check_number(name, getattr(self, name), 0.0, LATENCY_MAX_S)
        _check_number("slice_delay_s", self.slice_delay_s, 0.0, SLICE_DELAY_MAX_S)
        for name in ("drop_p", "reset_p"):
            _check_number(name, getattr(self, name), 0.0, 1.0)
        for name in ("bandwidth_bytes_per_s", "slice_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {value!r}")
        for name in ("blackhole", "paused"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def active(self) -> dict[str, Any]:
        """The fields that differ from the defaults (the toxics in effect)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in {low:g}..{high:g}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low:g}..{high:g}, got {value!r}")


@dataclasses.dataclass(slots=True)
class ProxyStats:
    """Counters of one proxy since it started."""

    connections: int = 0
    """Connections accepted (and not refused)."""
    refused: int = 0
    """Connections reset at once because ``connections_max`` were open."""
    connect_failures: int = 0
    """Connections closed because the target did not accept within the timeout."""
    bytes_up: int = 0
    """Bytes delivered to the target."""
    bytes_down: int = 0
    """Bytes delivered back to the clients."""
    dropped: int = 0
    """Connections closed by ``drop_p`` (a chunk lost)."""
    resets: int = 0
    """Connections reset: by ``reset_p``, after a black hole, or by :meth:`FaultProxy.reset_connections`."""
    blackholed_bytes: int = 0
    """Bytes swallowed by a black hole."""

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Conn:
    __slots__ = ("end", "lost", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.end: _End = "close"
        self.lost = False  # a black hole swallowed some of its data


class FaultProxy:
    """A TCP proxy from ``listen_host:listen_port`` (0: a free port) to
    ``target_host:target_port`` that applies :class:`Toxics`; see the module docstring.

    Run it with ``await nursery.start(proxy.run)`` (or :func:`open_fault_proxy`); it
    serves until cancelled. Toxic changes take effect at once, from any trio task.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str | None = None,
        rng: random.Random | None = None,
        connections_max: int = CONNECTIONS_MAX_DEFAULT,
        chunk_bytes: int = CHUNK_BYTES_DEFAULT,
        queue_chunks: int = QUEUE_CHUNKS_DEFAULT,
        connect_timeout_s: float = CONNECT_TIMEOUT_S_DEFAULT,
    ) -> None:
        try:
            loopback = ipaddress.ip_address(listen_host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"a FaultProxy listens on a loopback address only (e.g. 127.0.0.1), not {listen_host!r}")
        if type(target_port) is not int or not 1 <= target_port <= 65535:
            raise ValueError(f"target_port must be an integer in 1..65535, got {target_port!r}")
        if type(listen_port) is not int or not 0 <= listen_port <= 65535:
            raise ValueError(f"listen_port must be an integer in 0..65535 (0: a free port), got {listen_port!r}")
        for what, value in (
            ("connections_max", connections_max),
            ("chunk_bytes", chunk_bytes),
            ("queue_chunks", queue_chunks),
        ):
            if type(value) is not int or value < 1:
                raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
        _check_number("connect_timeout_s", connect_timeout_s, 0.001, 3600.0)
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.name = name or f"proxy->{target_host}:{target_port}"
        self.rng = rng or random.Random(0)
        self.connections_max = connections_max
        self.chunk_bytes = chunk_bytes
        self.queue_chunks = queue_chunks
        self.connect_timeout_s = connect_timeout_s
        self.stats = ProxyStats()
        self._listen_port = listen_port
        self._port: int | None = None
        self._toxics = Toxics()
        self._changed = trio.Event()
        self._conns: set[_Conn] = set()

    def __repr__(self) -> str:
        where = f"127.0.0.1:{self._port}" if self._port else "not listening"
        return f"<FaultProxy {self.name} {where} -> {self.target[0]}:{self.target[1]} {self._toxics.active()}>"

    # -- toxics ----------------------------------------------------------------------------

    @property
    def toxics(self) -> Toxics:
        """The toxics in effect."""
        return self._toxics

    def set_toxic(
        self,
        *,
        latency_s: float | None = None,
        jitter_s: float | None = None,
        bandwidth_bytes_per_s: int | None = None,
        slice_bytes: int | None = None,
        slice_delay_s: float | None = None,
        drop_p: float | None = None,
        reset_p: float | None = None,
        blackhole: bool | None = None,
        paused: bool | None = None,
    ) -> Toxics:
        """Change the named toxics (the others stay); returns the toxics now in effect.
        ``ValueError`` (and no change) for a value out of range."""
        changes = {k: v for k, v in locals().items() if k != "self" and v is not None}
        return self.set_toxics(dataclasses.replace(self._toxics, **changes))

    def set_toxics(self, toxics: Toxics) -> Toxics:
        """Replace all toxics at once."""
        if not isinstance(toxics, Toxics):
            raise TypeError(f"expected Toxics, got {type(toxics).__name__}")
        self._toxics = toxics
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        return toxics

    def heal(self) -> None:
        """All toxics off. Connections a black hole swallowed data of are reset."""
        self.set_toxics(Toxics())

    def reset_connections(self) -> int:
        """Reset (RST) every open connection now; returns how many."""
        for conn in self._conns:
            conn.end = "reset"
            conn.scope.cancel()
        return len(self._conns)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- serving ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (after :meth:`run` started)."""
        if self._port is None:
            raise RuntimeError(f"{self.name} is not running yet: start it with `await nursery.start(proxy.run)`")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    async def run(self, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and forward until cancelled; ``task_status.started(self)`` once listening."""
        listeners = await trio.open_tcp_listeners(self._listen_port, host=self.listen_host)
        self._port = int(listeners[0].socket.getsockname()[1])
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(self)
        finally:
            self._port = None

    async def _handle(self, downstream: trio.SocketStream) -> None:
        if len(self._conns) >= self.connections_max:
            self.stats.refused += 1
            _abort(downstream)
            return
        self.stats.connections += 1
        conn = _Conn()
        self._conns.add(conn)
        upstream: trio.SocketStream | None = None
        try:
            with conn.scope:
                await self._while_paused()
                if self._toxics.blackhole:
                    conn.lost = True
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._guard, conn)
                        await self._swallow(downstream)
                        nursery.cancel_scope.cancel()
                    return
                try:
                    with trio.fail_after(self.connect_timeout_s):
                        upstream = await trio.open_tcp_stream(*self.target)
                except (OSError, trio.TooSlowError):
                    self.stats.connect_failures += 1
                    conn.end = "reset"  # as the target's refusal would
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, conn)
                    async with trio.open_nursery() as pumps:
                        pumps.start_soon(self._pump, conn, downstream, upstream, "up")
                        pumps.start_soon(self._pump, conn, upstream, downstream, "down")
                    nursery.cancel_scope.cancel()
        finally:
            self._conns.discard(conn)
            for stream in (downstream, upstream):
                if stream is None:
                    continue
                if conn.end == "reset":
                    _abort(stream)
                with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError, OSError):
                    await stream.aclose()

    async def _while_paused(self) -> None:
        while self._toxics.paused:
            await self._changed.wait()

    async def _guard(self, conn: _Conn) -> None:
        """Reset the connection once a black hole that swallowed its data is gone."""
        while True:
            changed = self._changed
            if conn.lost and not self._toxics.blackhole:
                self.stats.resets += 1
                conn.end = "reset"
                conn.scope.cancel()
                return
            await changed.wait()

    async def _swallow(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(self.chunk_bytes):
                self.stats.blackholed_bytes += len(data)

    async def _pump(self, conn: _Conn, source: trio.SocketStream, sink: trio.SocketStream, direction: str) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](self.queue_chunks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, conn, source, send)
            nursery.start_soon(self._write, conn, sink, receive, direction)

    def _end(self, conn: _Conn, how: _End) -> None:
        conn.end = how
        conn.scope.cancel()

    async def _read(
        self, conn: _Conn, source: trio.SocketStream, send: trio.MemorySendChannel[tuple[float, bytes]]
    ) -> None:
        async with send:
            while True:
                await self._while_paused()
                try:
                    data = await source.receive_some(self.chunk_bytes)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._end(conn, "reset")  # the peer reset: so does the other side
                    return
                if not data:
                    return  # end of stream: the writer forwards it after the queued data
                toxics = self._toxics
                if toxics.blackhole or conn.lost:  # once data is lost nothing after the gap may pass
                    conn.lost = True
                    self.stats.blackholed_bytes += len(data)
                    continue
                if toxics.reset_p and self.rng.random() < toxics.reset_p:
                    self.stats.resets += 1
                    self._end(conn, "reset")
                    return
                if toxics.drop_p and self.rng.random() < toxics.drop_p:
                    self.stats.dropped += 1
                    self._end(conn, "close")
                    return
                delay_s = toxics.latency_s
                if toxics.jitter_s:
                    delay_s = max(0.0, delay_s + self.rng.uniform(-toxics.jitter_s, toxics.jitter_s))
                try:
                    await send.send((trio.current_time() + delay_s, data))
                except trio.BrokenResourceError:
                    return  # the writer side already ended this connection

    async def _write(
        self,
        conn: _Conn,
        sink: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
        direction: str,
    ) -> None:
        previous_at = -math.inf
        try:
            async with receive:
                async for deliver_at, data in receive:
                    previous_at = deliver_at = max(deliver_at, previous_at)  # TCP keeps the order
                    await trio.sleep_until(deliver_at)
                    await self._while_paused()
                    toxics = self._toxics
                    if toxics.blackhole or conn.lost:  # it fell in while queued, or follows a gap
                        conn.lost = True
                        self.stats.blackholed_bytes += len(data)
                        continue
                    step = toxics.slice_bytes or len(data)
                    rate = toxics.bandwidth_bytes_per_s
                    if rate:  # pieces of at most 0.1 s worth, each sent once its time has passed
                        step = min(step, max(1, rate // 10))
                    for offset in range(0, len(data), step):
                        piece = data[offset : offset + step]
                        if offset and toxics.slice_delay_s:
                            await trio.sleep(toxics.slice_delay_s)
                        if rate:
                            await trio.sleep(len(piece) / rate)
                        await sink.send_all(piece)
                        if direction == "up":
                            self.stats.bytes_up += len(piece)
                        else:
                            self.stats.bytes_down += len(piece)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end(conn, "reset")


def _abort(stream: trio.SocketStream) -> None:
    """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@contextlib.asynccontextmanager
async def open_fault_proxy(target_host: str, target_port: int, **kwargs: Any) -> AsyncIterator[FaultProxy]:
    """A running :class:`FaultProxy` (the arguments are its constructor's); stopped on exit."""
    proxy = FaultProxy(target_host, target_port, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
