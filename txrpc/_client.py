"""The trio client: one multiplexed connection, deadlines from cancel scopes, cancel
propagation, reconnect with backoff and retries only where they are safe."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import outcome
import trio

from . import _connection as wire
from . import _env
from ._errors import Code, DeadlineExceeded, PermissionDenied, ProtocolError, RpcError, Unauthenticated, Unavailable
from ._limits import Limits
from ._outbox import Outbox
from ._receiver import Receiver
from ._security import Credentials, current_credentials, is_certificate_failure
from ._service import _current_call
from ._timers import DueTimer

log = logging.getLogger("txrpc.client")

StreamOpener = Callable[[], Awaitable[trio.abc.Stream]]
RECEIVE_BYTES = 65536
RECEIVE_BYTES_MAX = 4 * 1024 * 1024  # one read may take the rest of a large frame, up to this
# Checkpoint after this many events of one read, so answers (server) and new calls
# (client) stream out while the rest is dispatched: the two processes then work in
# parallel instead of in lockstep (measured: ~1.6x calls/s at 64 callers).
DISPATCH_BATCH_EVENTS = 16

# Errors after which a call carrying an idempotency key may be sent again: the server
# either did not run it, or will answer a repeat from its request log.
RETRYABLE_WITH_KEY = frozenset({Code.UNAVAILABLE, Code.REQUEST_IN_PROGRESS})
# Errors that say nothing ran but that a retry would only repeat.
NEVER_RETRIED = frozenset({Code.PROTOCOL_ERROR, Code.UNAUTHENTICATED, Code.PERMISSION_DENIED})
KEY_METADATA = "idempotency_key"
KEY_SEQ_BITS = 48  # generated keys: a counter (from a random start), then random bits
KEY_SEQ_MASK = (1 << KEY_SEQ_BITS) - 1
WAIT_METADATA = "idempotency_wait"


class DeadlinePassed(Exception):
    """Internal: the ``deadline`` given to :meth:`Client._call_once` passed before the
    answer came (the server was told to cancel the call; it may have run), or before
    the call was sent (``sent`` false: nothing ran). The cluster client's per-operation
    path uses it instead of a cancel scope per call."""

    def __init__(self, sent: bool = True) -> None:
        super().__init__("deadline passed" if sent else "deadline passed before the call was sent")
        self.sent = sent


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A result with its metadata (``client.options(with_metadata=True)``).

    ``metadata["replayed"]`` is true when the server answered from its request log
    (the handler did not run for this call).
    """

    value: Any
    metadata: dict[str, Any]

    @property
    def replayed(self) -> bool:
        return self.metadata.get("replayed") is True


@dataclasses.dataclass(frozen=True, slots=True)
class CallOptions:
    """Per-call settings; build them with ``client.options(...)``.

    ``idempotency_key`` runs the call at most once per key on a server with a request
    log; ``idempotent=True`` makes the client generate a fresh key for each call (from
    its ``rng``) and reuse it across that call's retries. ``wait=True`` asks the
    server to wait (within the call's deadline) for a run of the same key still in
    progress instead of answering ``RequestInProgress``. ``with_metadata=True``
    returns a :class:`Reply` (value and result metadata) instead of the bare value.
    """

    timeout_s: float | None = None
    metadata: tuple[tuple[str, Any], ...] = ()
    idempotency_key: str | None = None
    retries_max: int | None = None  # None: the client's Limits.retries_max
    idempotent: bool = False
    wait: bool = False
    with_metadata: bool = False

    def merged(self, **changes: Any) -> CallOptions:
        metadata = dict(self.metadata)
        if "metadata" in changes:
            metadata.update(changes.pop("metadata") or {})
        if "timeout" in changes:
            changes["timeout_s"] = changes.pop("timeout")
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown call options: {sorted(unknown)}")
        return dataclasses.replace(self, metadata=tuple(metadata.items()), **changes)


_ONE_ATTEMPT = CallOptions(retries_max=0)


class _Channel:
    """One connection of a client: the sans-IO state, the outbox and the waiting calls."""

    def __init__(self, client: Client, stream: trio.abc.Stream) -> None:
        self.client = client
        self.stream = stream
        self.conn = wire.Connection(wire.Role.CLIENT, client.limits)
        self.outbox = Outbox(stream, client.limits.write_buffer_bytes_max)
        self.waiters: dict[int, trio.lowlevel.Task] = {}
        self.slots = trio.lowlevel.ParkingLot()
        self.inflight_max = client.limits.calls_inflight_max
        self.failure: str | None = None
        self.last_receive_time = trio.current_time()
        self.done = trio.Event()
        self.scope = trio.CancelScope()
        # Calls given an explicit deadline: (deadline, call id), served by _expire; an
        # entry is wanted while its call waits.
        self.timer = DueTimer[tuple[float, int]](lambda entry: entry[1] in self.waiters)

    @property
    def usable(self) -> bool:
        return self.failure is None and self.conn.accepts_calls

    async def handshake(self, auth: Any) -> None:
        await self.stream.send_all(self.conn.send_hello(auth=auth))
        while not self.conn.is_open:
            data = await self.stream.receive_some(RECEIVE_BYTES)
            for event in self.conn.receive_data(bytes(data)):
                if isinstance(event, wire.GoAway):
                    message = f"server refused the connection: {event.message}"
                    if event.code == Code.UNAUTHENTICATED:
                        raise Unauthenticated(message, {"not_started": True})
                    if event.code == Code.PERMISSION_DENIED:
                        raise PermissionDenied(message, {"not_started": True})
                    raise Unavailable(message, {"not_started": True})
                if isinstance(event, wire.ConnectionClosed):
                    raise Unavailable("server closed the connection during hello", {"not_started": True})
        peer_max = self.conn.peer_limits.get("calls_inflight_max")
        if peer_max:
            self.inflight_max = min(self.inflight_max, peer_max)

    async def run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write)
                    nursery.start_soon(self._keepalive)
                    nursery.start_soon(self._expire)
                    await self._read()
                    nursery.cancel_scope.cancel()
        finally:
            self._fail_all(self.failure or "connection closed")
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            self.done.set()

    async def _write(self) -> None:
        await self.outbox.run()
        if self.outbox.broken is not None and self.failure is None:
            self.failure = f"send failed: {self.outbox.broken!r}"
            self.kill()

    def kill(self) -> None:
        """End the connection now: waiting calls fail with ``Unavailable``."""
        self.outbox.close_after_flush()
        self.scope.cancel()

    async def _read(self) -> None:
        conn = self.conn
        waiters = self.waiters
        reschedule = trio.lowlevel.reschedule
        receiver = Receiver(self.stream)
        while True:
            try:
                data = await receiver.receive(max(RECEIVE_BYTES, min(conn.receive_size_hint, RECEIVE_BYTES_MAX)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.failure = self.failure or f"connection lost: {exc!r}"
                return
            self.last_receive_time = trio.current_time()
            try:
                events = conn.receive_data(data)
            except wire.RemoteProtocolError as exc:
                self.failure = f"server broke the protocol: {exc.message}"
                return
            for index, event in enumerate(events, 1):
                if index % DISPATCH_BATCH_EVENTS == 0:
                    await trio.lowlevel.checkpoint()  # let woken callers send new calls sooner
                kind = type(event)
                if kind is wire.Result:
                    task = waiters.pop(event.id, None)  # type: ignore[union-attr]
                    if task is not None:
                        if event.metadata:  # type: ignore[union-attr]
                            value = Reply(event.value, event.metadata)  # type: ignore[union-attr]
                        else:
                            value = event.value  # type: ignore[union-attr]
                        reschedule(task, outcome.Value(value))
                        if self.slots:
                            self.slots.unpark()
                elif kind is wire.Error:
                    task = waiters.pop(event.id, None)  # type: ignore[union-attr]
                    if task is not None:
                        error = RpcError.from_wire(event.code, event.message, event.details)  # type: ignore[union-attr]
                        reschedule(task, outcome.Error(error))
                        if self.slots:
                            self.slots.unpark()
                elif kind is wire.Ping:
                    self.outbox.put_nowait(conn.send_pong(event.nonce))  # type: ignore[union-attr]
                elif kind is wire.GoAway:
                    self._on_goaway(event)  # type: ignore[arg-type]
                elif kind is wire.ConnectionClosed:
                    self.failure = self.failure or "server closed the connection"
                    return
            if conn.remote_goaway is not None and not waiters:
                self.failure = self.failure or "server said goaway"
                return

    def _on_goaway(self, goaway: wire.GoAway) -> None:
        reason = goaway.message or "server said goaway"
        if goaway.code == Code.PROTOCOL_ERROR:
            log.warning("server reported a protocol error: %s", reason)
        for call_id in sorted(self.waiters):
            if call_id > goaway.last_id:
                task = self.waiters.pop(call_id)
                self.conn.forget_call(call_id)
                trio.lowlevel.reschedule(task, outcome.Error(Unavailable(reason, {"not_started": True})))

    def _fail_all(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        for call_id, task in list(self.waiters.items()):
            self.conn.forget_call(call_id)
            error = Unavailable(f"{reason}; the call may or may not have run", {"not_started": False})
            trio.lowlevel.reschedule(task, outcome.Error(error))
        self.waiters.clear()
        self.slots.unpark_all()

    async def _expire(self) -> None:
        """Fail the calls whose explicit deadline has passed, as their own cancel scope
        would have: the server is told to cancel, the caller gets :class:`DeadlinePassed`.
        One sleeping task per connection instead of a cancel scope per call (entering and
        leaving one was ~15 % of a cluster client's CPU in ``txrpc bench tx``)."""
        await self.timer.run(self._deadline_due)

    def _deadline_due(self, entry: tuple[float, int], now: float) -> None:
        task = self.waiters.pop(entry[1], None)
        if task is None:
            return  # answered (or failed) already
        self.outbox.put_nowait(self.conn.send_cancel(entry[1]))
        if self.slots:
            self.slots.unpark()
        trio.lowlevel.reschedule(task, outcome.Error(DeadlinePassed()))

    async def _keepalive(self) -> None:
        """Ping when nothing has arrived for ``keepalive_interval_s``; give up when
        nothing (not even a pong) has arrived for interval + ``keepalive_timeout_s``."""
        limits = self.client.limits
        nonce = 0
        while True:
            await trio.sleep(limits.keepalive_interval_s)
            silent_s = trio.current_time() - self.last_receive_time
            if silent_s >= limits.keepalive_interval_s + limits.keepalive_timeout_s:
                self.failure = f"no answer to keepalive pings for {silent_s:.1f} s"
                self.kill()
                return
            if silent_s >= limits.keepalive_interval_s:
                nonce += 1
                self.outbox.put_nowait(self.conn.send_ping(nonce))

    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        metadata: dict[str, Any] | None,
        deadline: float = math.inf,
    ) -> Any:
        """``deadline``: besides the caller's cancel scopes, the call ends with
        :class:`DeadlinePassed` at this time (trio clock)."""
        if len(self.waiters) >= self.inflight_max and self.failure is None:
            with trio.move_on_at(deadline):
                while len(self.waiters) >= self.inflight_max and self.failure is None:
                    await self.slots.park()
            if trio.current_time() >= deadline:
                raise DeadlinePassed(sent=False)
        if not self.usable:
            raise Unavailable(self.failure or "connection is going away", {"not_started": True})
        conn = self.conn
        now = trio.current_time()
        # A finite deadline always gets a timer, even when an enclosing scope is nearer
        # now: that scope's deadline may be pushed back while the call waits.
        timed = deadline != math.inf
        if timed and deadline <= now:
            raise DeadlinePassed(sent=False)
        effective = min(trio.current_effective_deadline(), deadline)
        remaining = None if effective == math.inf else effective - now
        call_id = conn.next_call_id()
        try:
            data = conn.send_call(call_id, method, args, kwargs, remaining, metadata)
        except TypeError as exc:
            raise TypeError(f"arguments of {method!r} cannot be sent: {exc}") from None
        except wire.LocalProtocolError as exc:
            raise ProtocolError(f"call to {method!r} not sent: {exc}", {"not_started": True}) from None
        waiters = self.waiters
        task = trio.lowlevel.current_task()
        waiters[call_id] = task
        if timed:
            self.timer.push((deadline, call_id))
        # The only call in flight: send it now, not a round later (and without the writer).
        self.outbox.put_nowait(data, write_now=len(waiters) == 1)

        def abort(_: Any) -> trio.lowlevel.Abort:
            if waiters.pop(call_id, None) is not None and self.failure is None:
                self.outbox.put_nowait(conn.send_cancel(call_id))
                if self.slots:
                    self.slots.unpark()
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


class Client:
    """An RPC client over one multiplexed connection (reopened when it breaks).

    Use it as ``async with txrpc.connect(host, port) as client:``. Calls:
    ``await client.call("calc.add", 1, 2)`` or ``await client.calc.add(1, 2)``.

    Deadlines come from trio: inside ``with trio.fail_after(0.5):`` the remaining time
    travels with the call and the server runs the handler under it; a call made from
    inside a handler inherits the deadline of the call being served. Cancelling the
    caller sends ``cancel`` and the server cancels the handler.
    """

    def __init__(
        self,
        open_stream: StreamOpener,
        *,
        target: str = "",
        limits: Limits | None = None,
        auth: Any = None,
        metadata: dict[str, Any] | None = None,
        rng: random.Random | None = None,
        connect_now: bool = True,
    ) -> None:
        """``auth`` goes in the hello (``{"bearer": TOKEN}``), or is a function returning
        it, called at every (re)connect (so a fresh token is sent)."""
        self._connect_now = connect_now
        self._open_stream = open_stream
        self.target = target or "server"
        self.limits = limits or Limits()
        self._auth = auth
        self._rng = rng or random.Random(0)
        # Generated idempotency keys come from the rng the caller passed (reproducible
        # runs), else from one seeded per client from the OS: every anonymous caller
        # shares one key scope, so two processes must never draw the same keys.
        self._key_rng = rng or random.Random(int.from_bytes(os.urandom(16), "big"))
        self._key_seq = self._key_rng.getrandbits(KEY_SEQ_BITS)
        self._default = CallOptions(metadata=tuple((metadata or {}).items()))
        self._channel: _Channel | None = None
        self._connect_lock = trio.Lock()
        self._connect_failures = 0
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        if not self._connect_now:
            return self  # the first call connects
        try:
            await self._get_channel()
        except BaseException:
            self._nursery.cancel_scope.cancel()
            await self._nursery_manager.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # The body's exception is not the nursery's business: the client's own tasks
        # never raise, so the caller sees its exception unwrapped (no ExceptionGroup).
        await self.aclose()
        await self._nursery_manager.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with ``Unavailable``."""
        self._closed = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- calls ----------------------------------------------------------------------

    def options(self, **options: Any) -> BoundClient:
        """A view of this client whose calls use ``options``: ``timeout`` (seconds),
        ``metadata`` (map), ``idempotency_key``, ``idempotent`` (generate a key per
        call), ``wait``, ``with_metadata``, ``retries_max`` (see :class:`CallOptions`)."""
        return BoundClient(self, self._default.merged(**options))

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` with ``args``/``kwargs`` and return its result.

        Raises an :class:`RpcError` subclass for errors (``DeadlineExceeded``,
        ``Unavailable``, ``InvalidArgument``, ``Unimplemented``, ...); on cancel the
        server is told to cancel the handler.
        """
        return await self._invoke(method, args, kwargs, self._default)

    def __getattr__(self, name: str) -> MethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return MethodProxy(self, name, self._default)

    async def _call_once(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        metadata: dict[str, Any],
        deadline: float = math.inf,
    ) -> Any:
        """``self.options(metadata=metadata, retries_max=0).call(method, *args, **kwargs)``
        without building the options (the cluster client's per-operation path). With a
        finite ``deadline`` (trio clock), it also ends then, raising :class:`DeadlinePassed`
        -- what a cancel scope around the call would do, without the scope's cost."""
        if self._default.metadata:
            metadata = {**dict(self._default.metadata), **metadata}
        if not math.isfinite(deadline):
            return await self._invoke_with_retries(method, args, kwargs, _ONE_ATTEMPT, metadata)
        serving = _current_call.get()
        if serving is not None and "trace_id" in serving.metadata:
            metadata.setdefault("trace_id", serving.metadata["trace_id"])
        channel = self._channel
        if channel is None or not channel.usable:
            channel = None
            with trio.move_on_at(deadline):
                channel = await self._get_channel()
            if channel is None:
                raise DeadlinePassed(sent=False)
        try:
            result = await channel.call(method, args, kwargs, metadata, deadline)
        except DeadlineExceeded:
            # The server's deadline is ours plus the transit: its answer can beat our
            # timer to a caller stalled past the deadline. Ours passed: say so, as the
            # timer would have (a cancel scope's deadline always won that race).
            if trio.current_time() >= deadline:
                raise DeadlinePassed() from None
            raise
        return result.value if type(result) is Reply else result

    async def _call_retried(self, method: str, args: tuple[Any, ...], deadline: float) -> Any:
        """``self.call(method, *args)`` (its retries of calls that did not run, with
        backoff) that also ends at ``deadline`` (trio clock) with :class:`DeadlinePassed`:
        what a cancel scope around the call did, without a scope per call (the
        coordinator's calls to participants)."""
        attempt = 0
        retries_max = self.limits.retries_max
        while True:
            try:
                return await self._call_once(method, args, {}, {}, deadline)
            except RpcError as exc:
                if not exc.nothing_ran or exc.code in NEVER_RETRIED or attempt >= retries_max or self._closed:
                    raise
            attempt += 1
            wake = trio.current_time() + self._backoff_s(attempt)
            if wake >= deadline:
                await trio.sleep_until(deadline)
                raise DeadlinePassed(sent=False)
            await trio.sleep_until(wake)

    async def _invoke(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: CallOptions) -> Any:
        if options.timeout_s is None:
            return await self._invoke_with_retries(method, args, kwargs, options)
        with trio.move_on_after(options.timeout_s) as scope:
            return await self._invoke_with_retries(method, args, kwargs, options)
        assert scope.cancelled_caught
        raise DeadlineExceeded(f"{method}: no answer within timeout of {options.timeout_s} s")

    async def _invoke_with_retries(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: CallOptions,
        metadata: dict[str, Any] | None = None,
    ) -> Any:
        if metadata is None and options.metadata:
            metadata = dict(options.metadata)
        key = options.idempotency_key
        if key is None and options.idempotent:
            key = self.new_idempotency_key()
        if key is not None:
            metadata = metadata or {}
            metadata[KEY_METADATA] = key
            if options.wait:
                metadata[WAIT_METADATA] = True
        serving = _current_call.get()
        if serving is not None and "trace_id" in serving.metadata:
            metadata = metadata or {}
            metadata.setdefault("trace_id", serving.metadata["trace_id"])
        retries_max = self.limits.retries_max if options.retries_max is None else options.retries_max
        attempt = 0
        while True:
            try:
                channel = self._channel
                if channel is None or not channel.usable:
                    channel = await self._get_channel()
                result = await channel.call(method, args, kwargs, metadata)
                if type(result) is Reply:
                    return result if options.with_metadata else result.value
                return Reply(result, {}) if options.with_metadata else result
            except RpcError as exc:
                # A local protocol refusal (or a credential refusal) did not run either,
                # but would fail again.
                safe = (exc.nothing_ran and exc.code not in NEVER_RETRIED) or (
                    key is not None and exc.code in RETRYABLE_WITH_KEY
                )
                if not safe or attempt >= retries_max or self._closed:
                    raise
                attempt += 1
                await trio.sleep(self._backoff_s(attempt))

    def new_idempotency_key(self) -> str:
        """A fresh 128-bit idempotency key (32 hex digits) from the client's key rng.

        The first 48 bits count up from a random start, the other 80 are random: the
        keys one client generates sort in the order it made them, so the request log's
        key index grows at one place per client instead of at random places (a random
        key's insert dirties a page of its own: about twice the cost, `specs/storage.md`).
        Two clients' keys differ in their 80 random bits (and their random starts)."""
        self._key_seq = (self._key_seq + 1) & KEY_SEQ_MASK
        return f"{self._key_seq:012x}{self._key_rng.getrandbits(128 - KEY_SEQ_BITS):020x}"

    def _backoff_s(self, attempt: int) -> float:
        limits = self.limits
        base = min(limits.reconnect_backoff_s * 2.0 ** (attempt - 1), limits.reconnect_backoff_max_s)
        return base * self._rng.uniform(0.5, 1.0)

    async def _get_channel(self) -> _Channel:
        if self._closed or self._nursery is None:
            raise Unavailable("client is closed (use it inside `async with`)", {"not_started": True})
        async with self._connect_lock:
            channel = self._channel
            if channel is not None and channel.usable:
                return channel
            if self._connect_failures:
                await trio.sleep(self._backoff_s(self._connect_failures))
            try:
                with trio.fail_after(self.limits.connect_timeout_s):
                    stream = await self._open_stream()
                    channel = _Channel(self, stream)
                    try:
                        await channel.handshake(self._auth() if callable(self._auth) else self._auth)
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await trio.aclose_forcefully(stream)
                        raise
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                self._connect_failures += 1
                refused = is_certificate_failure(exc)
                if refused is not None:
                    # A certificate the other side rejects (or that we reject): retrying
                    # the same credentials cannot help.
                    raise Unauthenticated(
                        f"TLS with {self.target} failed: {refused}", {"not_started": True, "tls": True}
                    ) from None
                raise Unavailable(f"cannot connect to {self.target}: {exc}", {"not_started": True}) from None
            except wire.RemoteProtocolError as exc:
                self._connect_failures += 1
                message = f"hello with {self.target} failed: {exc.message}"
                raise ProtocolError(message, {"not_started": True}) from None
            except Unavailable:
                self._connect_failures += 1
                raise
            self._connect_failures = 0
            self._channel = channel
            self._nursery.start_soon(channel.run)
            return channel


class BoundClient:
    """A client view with fixed :class:`CallOptions` (from ``client.options(...)``)."""

    def __init__(self, client: Client, options: CallOptions) -> None:
        self._client = client
        self._options = options

    def options(self, **options: Any) -> BoundClient:
        return BoundClient(self._client, self._options.merged(**options))

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return await self._client._invoke(method, args, kwargs, self._options)

    def __getattr__(self, name: str) -> MethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return MethodProxy(self._client, name, self._options)


class MethodProxy:
    """``client.calc.add`` → a callable for the method ``calc.add``."""

    __slots__ = ("_client", "_name", "_options")

    def __init__(self, client: Client, name: str, options: CallOptions) -> None:
        self._client = client
        self._name = name
        self._options = options

    def __getattr__(self, name: str) -> MethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return MethodProxy(self._client, f"{self._name}.{name}", self._options)

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return self._client._invoke(self._name, args, kwargs, self._options)

    def __repr__(self) -> str:
        return f"<txrpc method {self._name!r} of {self._client.target}>"


def connect(
    host: str,
    port: int,
    *,
    limits: Limits | None = None,
    ssl_context: Any = None,
    auth: Any = None,
    credentials: Credentials | None = None,
    metadata: dict[str, Any] | None = None,
    rng: random.Random | None = None,
    connect_now: bool = True,
) -> Client:
    """A :class:`Client` for ``host:port`` over TCP (TLS when ``ssl_context`` is given).

    Use it as ``async with txrpc.connect("127.0.0.1", 12345) as client: ...``. Entering
    connects at once (and raises ``Unavailable`` if it cannot) unless
    ``connect_now=False``, in which case the first call connects.

    ``credentials`` (a :class:`~txrpc.Credentials`: TLS settings and/or a bearer token)
    default to those :func:`~txrpc.use_credentials` set for the calling task; an
    explicit ``ssl_context`` / ``auth`` wins over them. With TLS the server's
    certificate chain and name (``host``, or ``credentials.server_name``) are always
    verified; a certificate either side rejects raises ``Unauthenticated``.
    """
    if credentials is None:
        credentials = current_credentials()
    server_hostname = host
    if credentials is not None:
        if ssl_context is None:
            ssl_context = credentials.ssl_context()
        if auth is None and credentials.token is not None:
            auth = credentials.hello_auth
        server_hostname = credentials.tls_server_name(host)

    async def open_stream() -> trio.abc.Stream:
        stream: trio.abc.Stream = await _env.open_stream(host, port)
        if ssl_context is not None:
            ssl_stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname)
            try:
                await ssl_stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(ssl_stream)
                raise
            stream = ssl_stream
        return stream

    return Client(
        open_stream,
        target=f"{host}:{port}",
        limits=limits,
        auth=auth,
        metadata=metadata,
        rng=rng,
        connect_now=connect_now,
    )
