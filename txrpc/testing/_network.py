"""An in-memory network with per-link faults, for the deterministic simulator.

Nodes connect by ``host:port`` exactly as over TCP (the production code calls
``txrpc._env.open_stream`` / ``open_listeners``, which land here under simulation).
A connection is two one-way pipes. Faults apply per directed link ``src → dst`` and
per *frame* (the pipe splits the byte stream at txrpc's 4-byte length prefixes), so a
fault hits a whole message the way a lossy path or a buggy proxy would:

* ``drop_p``: the frame vanishes and the connection stays up (harsher than TCP,
  which would retransmit or reset: the caller only learns through its deadline);
* ``duplicate_p``: the frame arrives twice;
* ``reorder_p``: the frame may overtake frames sent before it;
* ``delay_s`` ± ``jitter_s``: one-way latency;
* ``reset_p``: the connection is reset (both ends see ``BrokenResourceError``);
* ``slice_p``: the frame arrives in several pieces spread over time (slow writes);
* ``blocked``: a partition — frames vanish and new connections time out. A one-way
  partition blocks only ``src → dst``.

Node faults: :meth:`SimNetwork.crash` resets every connection of a node and closes
its listeners; :meth:`SimNetwork.pause` holds everything to and from a node until a
time (a stopped process: nothing it sends leaves, nothing sent to it is read).

All randomness comes from the ``random.Random`` given to the network; all time from
``trio.current_time()`` (a ``MockClock`` in the simulator).
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import math
import random
from typing import Any

import trio

from .._timers import DueTimer

PREFIX_BYTES = 4
#: A length prefix above this is not a txrpc frame: the bytes pass through unframed.
FRAME_BYTES_PARSE_MAX = 64 * 1024 * 1024
#: Bytes queued in one pipe before the sender waits (bounded like a socket buffer).
PIPE_BYTES_MAX = 8 * 1024 * 1024
#: The least time between the pieces of a sliced frame (simulated seconds).
SLICE_GAP_S_MIN = 0.0005


@dataclasses.dataclass
class LinkFaults:
    """The faults of one directed link. Probabilities are per frame."""

    delay_s: float = 0.0005
    jitter_s: float = 0.0002
    drop_p: float = 0.0
    duplicate_p: float = 0.0
    reorder_p: float = 0.0
    reset_p: float = 0.0
    slice_p: float = 0.0
    blocked: bool = False

    def copy(self) -> LinkFaults:
        return dataclasses.replace(self)


class _Pipe:
    """One direction of a connection: ``src`` writes, ``dst`` reads.

    Frames in flight wait in ``queue`` (a heap by delivery time); the network's clock
    (:meth:`SimNetwork._clock`) moves those that are due into ``ready`` and wakes the
    reader directly, so a delivery costs the reader one scheduler step and no timer of
    its own. A read returns everything delivered so far (up to ``max_bytes``), as a TCP
    read returns what the kernel holds.
    """

    def __init__(self, net: SimNetwork, src: str, dst: str) -> None:
        self.net = net
        self.src = src
        self.dst = dst
        self.unframed = bytearray()  # sent, not yet a whole frame
        # In flight: a heap of (delivery time, sequence, bytes) -- plain tuples, compared in C.
        self.queue: list[tuple[float, int, bytes]] = []
        self.ready = bytearray()  # delivered, not yet read
        self.queued_bytes = 0  # in flight + delivered, not yet read
        self.last_deliver_at = 0.0
        self.eof = False  # the writer closed
        self.reader_closed = False
        self.reset = False
        self.reader: trio.lowlevel.Task | None = None  # parked in read()
        self.room = trio.lowlevel.ParkingLot()  # senders waiting for room (or a failure)
        self.connection: _Connection | None = None

    def _wake_reader(self) -> None:
        task = self.reader
        if task is not None:
            self.reader = None
            trio.lowlevel.reschedule(task)

    def _notify(self) -> None:
        """A state change (reset, end of stream, reader gone): wake everyone waiting."""
        self._wake_reader()
        self.room.unpark_all()

    def break_(self) -> None:
        self.reset = True
        self.queue.clear()
        self.ready.clear()
        self.queued_bytes = 0
        self._notify()

    def write(self, data: bytes) -> None:
        if not self.unframed and len(data) >= PREFIX_BYTES:
            # The common case: whole frames, nothing pending. Cut them straight from
            # ``data`` (no copy into ``unframed`` and back out).
            start, size = 0, len(data)
            while size - start >= PREFIX_BYTES:
                length = int.from_bytes(data[start : start + PREFIX_BYTES], "big")
                end = start + PREFIX_BYTES + length
                if length > FRAME_BYTES_PARSE_MAX or end > size:
                    break
                self._send_frame(data if start == 0 and end == size else data[start:end])
                if self.reset:
                    return
                start = end
            if start == size:
                return
            data = data[start:]
        self.unframed += data
        while True:
            if len(self.unframed) < PREFIX_BYTES:
                return
            length = int.from_bytes(self.unframed[:PREFIX_BYTES], "big")
            if length > FRAME_BYTES_PARSE_MAX:  # not a frame we can parse: pass it through
                frame = bytes(self.unframed)
                self.unframed.clear()
            else:
                end = PREFIX_BYTES + length
                if len(self.unframed) < end:
                    return
                frame = bytes(self.unframed[:end])
                del self.unframed[:end]
            self._send_frame(frame)
            if self.reset:
                return

    def _send_frame(self, frame: bytes) -> None:
        net = self.net
        rng = net.rng
        link = net.link(self.src, self.dst)
        net.stats["frames"] += 1
        if link.blocked:
            net.stats["blocked"] += 1
            return
        if link.drop_p and rng.random() < link.drop_p:
            net.stats["dropped"] += 1
            return
        if link.reset_p and rng.random() < link.reset_p:
            net.stats["resets"] += 1
            net.reset_connection_of(self)
            return
        copies = 2 if link.duplicate_p and rng.random() < link.duplicate_p else 1
        if copies == 2:
            net.stats["duplicated"] += 1
        now = trio.current_time()
        for _ in range(copies):
            delay = link.delay_s + (rng.uniform(-link.jitter_s, link.jitter_s) if link.jitter_s else 0.0)
            deliver_at = now + max(0.0, delay)
            if net.tick_s:  # deliveries land on ticks: fewer distinct wake-ups, same order rules
                deliver_at = math.ceil(deliver_at / net.tick_s) * net.tick_s
            deliver_at = max(deliver_at, net.paused_until.get(self.src, 0.0), net.paused_until.get(self.dst, 0.0))
            if link.reorder_p and rng.random() < link.reorder_p:
                net.stats["reordered"] += 1
            else:
                deliver_at = max(deliver_at, self.last_deliver_at)
            if link.slice_p and len(frame) > 1 and rng.random() < link.slice_p:
                net.stats["sliced"] += 1
                pieces = rng.randint(2, min(4, len(frame)))
                cuts = sorted(rng.sample(range(1, len(frame)), pieces - 1))
                start = 0
                gap_s = max(link.delay_s, SLICE_GAP_S_MIN)  # pieces due together would arrive as one
                for index, cut in enumerate([*cuts, len(frame)]):
                    self._push(deliver_at + index * gap_s, frame[start:cut])
                    start = cut
            else:
                self._push(deliver_at, frame)

    def _push(self, deliver_at: float, data: bytes) -> None:
        self.last_deliver_at = max(self.last_deliver_at, deliver_at)
        seq = self.net.next_seq()
        heapq.heappush(self.queue, (deliver_at, seq, data))
        self.queued_bytes += len(data)
        self.net._schedule(deliver_at, seq, self)

    def deliver_due(self, now: float) -> None:
        """Move the frames due by ``now`` to ``ready`` (in delivery order) and wake the reader."""
        queue = self.queue
        if not queue or queue[0][0] > now:
            return
        while queue and queue[0][0] <= now:
            self.ready += heapq.heappop(queue)[2]
        self._wake_reader()

    async def read(self, max_bytes: int) -> bytes:
        blocked = False  # parked at least once: that was this call's checkpoint
        while True:
            if self.reset:
                if not blocked:
                    await trio.lowlevel.checkpoint()
                raise trio.BrokenResourceError("connection reset (simulated)")
            if self.ready:
                if not blocked:
                    # Cancelled here, nothing is taken; after taking, no cancellation
                    # (a cancelled read must not lose what it took).
                    await trio.lowlevel.checkpoint_if_cancelled()
                data = bytes(self.ready[:max_bytes])
                del self.ready[:max_bytes]
                self.queued_bytes -= len(data)
                if self.room and self.queued_bytes <= PIPE_BYTES_MAX:
                    self.room.unpark_all()
                if not blocked:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            if not self.queue and self.eof:
                if not blocked:
                    await trio.lowlevel.checkpoint()
                return b""
            if self.reader is not None:
                raise trio.BusyResourceError("another task is reading this stream")
            if self.queue:
                self.net._ensure_clock()  # frames in flight from an earlier trio.run, say
            self.reader = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self.reader = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            blocked = True


class SimStream(trio.abc.Stream):
    """One end of a simulated connection."""

    def __init__(self, net: SimNetwork, outgoing: _Pipe, incoming: _Pipe, peer: str) -> None:
        self.net = net
        self._out = outgoing
        self._in = incoming
        self.peer = peer
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        pipe = self._out
        while pipe.queued_bytes > PIPE_BYTES_MAX and not pipe.reset and not pipe.reader_closed:
            await pipe.room.park()
        if pipe.reset or pipe.reader_closed:
            raise trio.BrokenResourceError("connection reset (simulated)")
        pipe.write(bytes(data))

    def send_nowait(self, data: bytes) -> int:
        """Take ``data`` now if a socket would (room in the buffer, the connection up);
        returns the bytes taken: all or nothing (0: let ``send_all`` find out why).
        What :class:`txrpc._outbox.Outbox` uses to write without its writer task, as it
        does with a non-blocking ``write`` on a TCP socket."""
        pipe = self._out
        if self._closed or pipe.reset or pipe.reader_closed or pipe.queued_bytes > PIPE_BYTES_MAX:
            return 0
        pipe.write(bytes(data))
        return len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("stream closed")
        return await self._in.read(max_bytes or 65536)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.eof = True
            self._out._notify()
            self._in.reader_closed = True
            self._in._notify()
            self.net.forget(self._out)
        await trio.lowlevel.checkpoint()


class SimListener(trio.abc.Listener[SimStream]):
    def __init__(self, net: SimNetwork, node: str, host: str, port: int) -> None:
        self.net = net
        self.node = node
        self.host = host
        self.port = port
        self._send, self._receive = trio.open_memory_channel[SimStream](128)
        self.closed = False

    async def accept(self) -> SimStream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("listener closed") from None

    def close_now(self) -> None:
        if not self.closed:
            self.closed = True
            self._send.close()
            self.net.listeners.pop((self.host, self.port), None)

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()


@dataclasses.dataclass(eq=False)
class _Connection:
    client_node: str
    server_node: str
    up: _Pipe  # client → server
    down: _Pipe  # server → client


class SimNetwork:
    """The network of one simulation. ``rng`` drives every fault decision."""

    def __init__(
        self,
        rng: random.Random,
        *,
        default: LinkFaults | None = None,
        connect_timeout_s: float = 1.0,
        tick_s: float = 0.0,
    ):
        self.rng = rng
        #: When > 0, delivery times are rounded up to a multiple of this (the simulator
        #: uses 0.5 ms: many deliveries then share one scheduler pass).
        self.tick_s = tick_s
        self.default = default or LinkFaults()
        self.connect_timeout_s = connect_timeout_s
        self.links: dict[tuple[str, str], LinkFaults] = {}
        self.listeners: dict[tuple[str, int], SimListener] = {}
        # Insertion-ordered (not a set of objects, whose order would follow memory
        # addresses): fault handling walks it, and a run must not depend on addresses.
        self.connections: dict[_Connection, None] = {}
        self.paused_until: dict[str, float] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            ("frames", "dropped", "duplicated", "reordered", "resets", "sliced", "blocked", "connects"), 0
        )
        self._seq = 0
        #: Deliveries to make: (time, sequence, pipe); run by :meth:`_clock`.
        self._timer = DueTimer[tuple[float, int, _Pipe]]()
        self._clock_token: trio.lowlevel.TrioToken | None = None

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _schedule(self, deliver_at: float, seq: int, pipe: _Pipe) -> None:
        """Deliver ``pipe``'s due frames at ``deliver_at`` (the clock task, started with the
        first delivery of each ``trio.run``, sleeps until the earliest one)."""
        self._ensure_clock()
        self._timer.push((deliver_at, seq, pipe))

    def _ensure_clock(self) -> None:
        """Start the clock task in this ``trio.run`` unless it runs here already."""
        token = trio.lowlevel.current_trio_token()
        if self._clock_token is not token:
            self._clock_token = token
            self._timer.scope = None  # (the last run's)
            trio.lowlevel.spawn_system_task(self._clock, name="txrpc.testing.SimNetwork.clock")

    async def _clock(self) -> None:
        """One timer for the whole network: at each delivery time, move what is due into
        its pipe and wake the reader (cheaper than a timer per waiting reader)."""
        await self._timer.run(_deliver)

    # -- faults ------------------------------------------------------------------------

    def link(self, src: str, dst: str) -> LinkFaults:
        """The (mutable) faults of ``src → dst``; created from the default on first use."""
        link = self.links.get((src, dst))
        if link is None:
            link = self.links[(src, dst)] = self.default.copy()
        return link

    def partition(self, a: str, b: str, *, one_way: bool = False) -> None:
        """Cut ``a → b`` (and ``b → a`` unless ``one_way``)."""
        self.link(a, b).blocked = True
        if not one_way:
            self.link(b, a).blocked = True

    def heal(self) -> None:
        """Remove every link fault and pause (back to the default link)."""
        self.default = LinkFaults(delay_s=self.default.delay_s, jitter_s=self.default.jitter_s)
        self.links.clear()
        self.paused_until.clear()

    def pause(self, node: str, until: float) -> None:
        """Hold every frame to and from ``node`` until ``until`` (trio time)."""
        self.paused_until[node] = max(until, self.paused_until.get(node, 0.0))

    def crash(self, node: str) -> None:
        """Reset every connection of ``node`` and close its listeners at once."""
        for listener in [lst for lst in self.listeners.values() if lst.node == node]:
            listener.close_now()
        for connection in [c for c in self.connections if node in (c.client_node, c.server_node)]:
            self._reset(connection)

    def reset_connection_of(self, pipe: _Pipe) -> None:
        if pipe.connection is not None:
            self._reset(pipe.connection)

    def forget(self, pipe: _Pipe) -> None:
        """One end closed: stop tracking the connection (the other end reads EOF)."""
        if pipe.connection is not None:
            self.connections.pop(pipe.connection, None)

    def _reset(self, connection: _Connection) -> None:
        connection.up.break_()
        connection.down.break_()
        self.connections.pop(connection, None)

    # -- the transport ----------------------------------------------------------------

    def listen(self, node: str, host: str, port: int) -> SimListener:
        if (host, port) in self.listeners:
            raise OSError(errno.EADDRINUSE, f"{host}:{port} is in use (simulated)")
        listener = SimListener(self, node, host, port)
        self.listeners[(host, port)] = listener
        return listener

    async def connect(self, node: str, host: str, port: int) -> SimStream:
        self.stats["connects"] += 1
        listener = self.listeners.get((host, port))
        if listener is None:
            await trio.sleep(self.default.delay_s)
            raise OSError(errno.ECONNREFUSED, f"connection refused by {host}:{port} (simulated)")
        server = listener.node
        if self.link(node, server).blocked or self.link(server, node).blocked:
            await trio.sleep(self.connect_timeout_s)
            raise OSError(errno.ETIMEDOUT, f"connect to {host}:{port} timed out (simulated partition)")
        await trio.sleep(2 * self.link(node, server).delay_s)
        if listener.closed:
            raise OSError(errno.ECONNREFUSED, f"connection refused by {host}:{port} (simulated)")
        up, down = _Pipe(self, node, server), _Pipe(self, server, node)
        connection = _Connection(node, server, up, down)
        self.connections[connection] = None
        up.connection = down.connection = connection
        try:
            listener._send.send_nowait(SimStream(self, down, up, node))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._reset(connection)
            raise OSError(errno.ECONNREFUSED, f"{host}:{port} backlog full or closed (simulated)") from None
        return SimStream(self, up, down, server)

    def describe(self) -> dict[str, Any]:
        return {"connections": len(self.connections), **self.stats}


def _deliver(entry: tuple[float, int, _Pipe], now: float) -> None:
    entry[2].deliver_due(now)
