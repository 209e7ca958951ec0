"""The trio server driver: accepts streams, runs the sans-IO connection, dispatches calls."""

from __future__ import annotations

import contextvars
import errno
import functools
import logging
import math
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from . import _connection as wire
from . import _env
from ._errors import Code, RpcError
from ._keyed import (
    EXPIRED,
    KEY_METADATA,
    LEASE_S_DEFAULT,
    RETENTION_S_DEFAULT,
    Answer,
    IdempotencyDriver,
)
from ._limits import Limits
from ._outbox import Outbox
from ._receiver import Receiver
from ._security import ANONYMOUS_PRINCIPAL, Principal, ServerSecurity, is_certificate_failure
from ._service import NOT_NOW, CallContext, Later, MethodSpec, Service, _current_call

if TYPE_CHECKING:
    from storage import BeginResult, RequestLog, Storage

log = logging.getLogger("txrpc.server")

RECEIVE_BYTES = 65536
RECEIVE_BYTES_MAX = 4 * 1024 * 1024  # one read may take the rest of a large frame, up to this
CLOSE_FLUSH_TIMEOUT_S = 5.0  # bound on writing queued frames once a connection is ending
REFUSE_TIMEOUT_S = 1.0  # bound on telling a refused connection why (a flood must not pile up tasks)
# Checkpoint after this many events of one read, so answers (server) and new calls
# (client) stream out while the rest is dispatched: the two processes then work in
# parallel instead of in lockstep (measured: ~1.6x calls/s at 64 callers).
DISPATCH_BATCH_EVENTS = 16
IDLE_SLACK = 1 / 16  # the idle timeout may close a connection this fraction of it late


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        inner = getattr(stream, "transport_stream", None)
        sock = getattr(inner, "socket", None)
    if sock is not None:
        try:
            address = sock.getpeername()
        except OSError:
            return "unknown"
        if isinstance(address, tuple):
            return f"{address[0]}:{address[1]}"
        return str(address) or "unix"
    return type(stream).__name__


class Server:
    """Serves one or more :class:`Service` objects on any number of streams.

    ``await server.serve_tcp(host, port)`` listens until :meth:`shutdown`;
    ``await server.serve_stream(stream)`` serves one already-open stream (TLS, Unix
    socket, in-memory pair). Use ``nursery.start(server.serve_tcp, host, port)`` to
    get the server back once it is listening; ``server.port`` is the bound port.

    **Idempotency keys.** With ``request_log`` (a ``storage.RequestLog``, or the
    ``storage.Storage`` from ``storage.open_storage``) a call whose metadata carries
    ``idempotency_key`` runs at most once per (caller identity, key) while its record
    is retained: see ``specs/guarantees.md``. ``wall_clock`` (seconds that survive
    restarts) times leases and retention; ``lease_s`` is how long an executor is
    presumed alive without renewing (it renews every ``lease_s / 3`` while its
    handler runs); records are pruned ``retention_s`` after completion, checked every
    ``prune_interval_s`` (default retention / 24, within 1 s .. 1 h) by a task that
    runs while the server listens. ``store_namespace`` is the ``txrpc_kv`` namespace
    of ``current_call().store``; ``identity_of(ctx)`` names the caller's key scope
    (default ``ctx.identity``: "anonymous" until authentication exists). Without a
    request log, a keyed call is refused with ``FAILED_PRECONDITION`` (nothing runs):
    the server could not keep the promise the key asks for.

    **Security.** With ``security`` (a :class:`~txrpc.ServerSecurity`) every stream is
    wrapped in TLS when it names a TLS context (the TLS handshake counts against
    ``handshake_timeout_s``), the hello must authenticate the caller (certificate or
    bearer token; else a goaway ``UNAUTHENTICATED`` and the connection closes), the
    caller's name becomes ``ctx.identity`` (so idempotency keys are scoped per
    authenticated identity) and each method's rule (``allow=``, or ``security.rules``)
    is enforced: ``PERMISSION_DENIED``, nothing runs. Without it every caller is
    ``"anonymous"`` and may call everything: a trusted network only.
    """

    def __init__(
        self,
        *services: Service,
        limits: Limits | None = None,
        request_log: RequestLog | Storage | None = None,
        wall_clock: Callable[[], float] = _env.wall_time,
        lease_s: float = LEASE_S_DEFAULT,
        retention_s: float = RETENTION_S_DEFAULT,
        prune_interval_s: float | None = None,
        store_namespace: str = "",
        identity_of: Callable[[CallContext], str] | None = None,
        security: ServerSecurity | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.security = security
        self.idempotency: IdempotencyDriver | None = None
        if request_log is not None:
            self.idempotency = IdempotencyDriver(
                request_log,
                wall_clock=wall_clock,
                lease_s=lease_s,
                retention_s=retention_s,
                prune_interval_s=prune_interval_s,
                store_namespace=store_namespace,
                identity_of=identity_of,
            )
        self.methods: dict[str, MethodSpec] = {}
        for service in services:
            self.add_service(service)
        self.listeners: list[Any] = []
        self._connections: set[_ServerConnection] = set()
        self._accepting = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._shutting_down = False
        self._drained = trio.Event()
        self._stopped = trio.Event()
        self.calls_started = 0

    def add_service(self, service: Service) -> None:
        for name, spec in service.methods.items():
            if name in self.methods:
                raise ValueError(f"method {name!r} is provided by two services")
            self.methods[name] = spec

    @property
    def port(self) -> int:
        """The TCP port of the first listener (useful with ``port=0``)."""
        if not self.listeners:
            raise RuntimeError("server is not listening")
        listener = self.listeners[0]
        sock = getattr(listener, "socket", None)
        if sock is None:  # a simulated listener
            return int(listener.port)
        return int(sock.getsockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def serve_tcp(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` and serve until :meth:`shutdown` completes."""
        self.listeners = await _env.open_listeners(host, port)
        await self.serve_listeners(self.listeners, task_status=task_status)

    async def serve_listeners(
        self,
        listeners: Iterable[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = list(listeners)
        try:
            with self._connections_scope:
                async with trio.open_nursery() as connections:
                    if self.idempotency is not None:
                        connections.start_soon(self.idempotency.run_pruner)
                        connections.start_soon(self.idempotency.run_lease_keeper)
                    with self._accepting:
                        async with trio.open_nursery() as accept:
                            for listener in listeners:
                                accept.start_soon(self._accept_loop, listener, connections)
                            task_status.started(self)
                    # Accepting stopped (shutdown): the nursery waits for connections to end.
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            self._stopped.set()

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    log.error("accept failed (%s); pausing 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self.serve_stream, stream)

    async def serve_stream(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        """Serve one connection until it closes; never raises for the peer's faults.

        With ``security`` naming a TLS context, a stream that is not already a
        ``trio.SSLStream`` is wrapped in one (server side) first."""
        peer = peer or _peer_name(stream)
        security = self.security
        if security is not None and security.ssl_context is not None and not isinstance(stream, trio.SSLStream):
            stream = trio.SSLStream(stream, security.ssl_context, server_side=True)
        connection = _ServerConnection(self, stream, peer)
        if len(self._connections) >= self.limits.connections_max or self._shutting_down:
            await connection.refuse(
                Code.RESOURCE_EXHAUSTED if not self._shutting_down else Code.UNAVAILABLE,
                f"server holds connections_max ({self.limits.connections_max}) connections"
                if not self._shutting_down
                else "server is shutting down",
            )
            return
        self._connections.add(connection)
        try:
            await connection.run()
        except Exception:
            # A bug must cost one connection, never the server.
            log.exception("connection from %s failed", connection.peer)
        finally:
            self._connections.discard(connection)
            if self._shutting_down and not self._connections:
                self._drained.set()

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Stop accepting, tell every connection goaway, let in-flight calls finish for
        up to ``grace_s`` (default ``limits.shutdown_grace_s``), then cancel the rest."""
        grace_s = self.limits.shutdown_grace_s if grace_s is None else grace_s
        self._shutting_down = True
        self._accepting.cancel()
        for connection in list(self._connections):
            connection.begin_goaway(Code.UNAVAILABLE, "server is shutting down")
        if self._connections:
            with trio.move_on_after(grace_s):
                await self._drained.wait()
        self._connections_scope.cancel()
        if self.listeners:
            await self._stopped.wait()


async def _send_tls_alert(stream: trio.SSLStream[Any]) -> None:
    """After a failed TLS handshake, deliver the alert OpenSSL produced (trio keeps it
    unsent) and half-close, so the peer learns *why* (e.g. "unknown ca") instead of
    seeing a reset. Bounded by ``REFUSE_TIMEOUT_S``."""
    outgoing = getattr(stream, "_outgoing", None)
    alert = outgoing.read() if isinstance(outgoing, ssl.MemoryBIO) else b""
    transport = stream.transport_stream
    with trio.move_on_after(REFUSE_TIMEOUT_S):
        try:
            if alert:
                await transport.send_all(alert)
            if isinstance(transport, trio.SocketStream):
                await transport.send_eof()
            while await transport.receive_some(RECEIVE_BYTES):
                pass  # drain until the peer closes: closing with unread data would reset
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class _ServerConnection:
    def __init__(self, server: Server, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.limits = server.limits
        self.conn = wire.Connection(wire.Role.SERVER, self.limits)
        self.outbox = Outbox(stream, self.limits.write_buffer_bytes_max, self.limits.send_stall_timeout_s)
        self.receiver = Receiver(stream)
        self.scopes: dict[int, trio.CancelScope] = {}
        self.queued_keyed: set[int] = set()  # calls _start_keyed started (no scope: cancelled by mark)
        self.unscoped: set[int] = set()  # calls of bounded handlers running (no scope: cancelled by mark)
        self.later: set[int] = set()  # calls try_now answers later (no task: cancelled by mark)
        self.cancelled_by_peer: set[int] = set()
        self.principal: Principal = ANONYMOUS_PRINCIPAL
        self.identity = self.principal.name
        self.roles: frozenset[str] = frozenset()
        self._draining = False
        self._nursery: trio.Nursery | None = None

    async def refuse(self, code: Code, message: str) -> None:
        # Bounded tightly: refused connections are not counted in connections_max, so a
        # flood of them (e.g. TLS connections that never finish their handshake) must
        # not hold a task each for long.
        stream = self.stream
        try:
            with trio.move_on_after(min(self.limits.handshake_timeout_s, REFUSE_TIMEOUT_S)):
                await stream.send_all(self.conn.send_goaway(code, message))
                if isinstance(stream, trio.SocketStream):
                    # Half-close and drain what the peer sent (its hello): closing with
                    # unread bytes would reset the connection and lose the goaway.
                    await stream.send_eof()
                    while await stream.receive_some(RECEIVE_BYTES):
                        pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await trio.aclose_forcefully(stream)

    def begin_goaway(self, code: Code, message: str) -> None:
        """Graceful: no new calls; the connection closes once in-flight calls finish."""
        if self._draining:
            return
        self._draining = True
        if self.conn.is_open:
            self.outbox.put_nowait(self.conn.send_goaway(code, message))
        if not self.conn.inflight or not self.conn.is_open:
            self._close_soon()

    def _close_soon(self) -> None:
        self.outbox.close_after_flush()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_then_close)
                try:
                    await self._read_loop(nursery)
                except wire.RemoteProtocolError as exc:
                    log.info("protocol error from %s: %s", self.peer, exc.message)
                    self.outbox.put_nowait(self.conn.send_goaway(exc.code, exc.message))
                # Reader done: the peer closed, broke the protocol or the stream broke.
                self.conn.close()
                # Bound the flush of what is queued; handlers are cancelled (their caller is gone).
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_FLUSH_TIMEOUT_S
                for scope in self.scopes.values():
                    scope.cancel()
                self._close_soon()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    try:
                        await self.stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass

    async def _write_then_close(self) -> None:
        await self.outbox.run()
        # All queued frames are out (or the stream broke): end the connection.
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        conn = self.conn
        stream = self.stream
        limits = self.limits
        security = self.server.security
        # Handshake: TLS (if any) and the hello must complete within handshake_timeout_s.
        with trio.move_on_after(limits.handshake_timeout_s) as handshake:
            if isinstance(stream, trio.SSLStream):
                try:
                    await stream.do_handshake()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    reason = is_certificate_failure(exc) or f"TLS handshake failed: {exc.__cause__ or exc!r}"
                    log.info("connection from %s refused: %s", self.peer, reason)
                    await _send_tls_alert(stream)
                    return
            while not conn.is_open:
                data = await self._receive()
                for event in conn.receive_data(data):
                    if isinstance(event, wire.ConnectionClosed):
                        return
                    if isinstance(event, wire.Hello):
                        if security is not None:
                            await self._authenticate(security, event)
                        self.outbox.put_nowait(conn.send_hello(agent="txrpc-py"))
        if handshake.cancelled_caught:
            raise wire.RemoteProtocolError(
                f"no hello within handshake_timeout_s ({limits.handshake_timeout_s} s)",
                Code.DEADLINE_EXCEEDED,
            )
        methods = self.server.methods
        rules: dict[str, frozenset[str] | None] | None = None if security is None else {}
        outbox = self.outbox
        # Moving a scope's deadline costs trio some µs, once per read: the idle deadline
        # is moved only once it is nearer than idle_timeout_s, and then to
        # idle_timeout_s * (1 + IDLE_SLACK) from now. A silent connection is closed
        # between idle_timeout_s and that after its last read: never sooner.
        idle_s = limits.idle_timeout_s
        idle_deadline = -math.inf
        idle = trio.CancelScope()
        with idle:
            while True:
                if outbox.queued_bytes > limits.write_buffer_bytes_max:
                    # The peer is not reading its replies: stop reading its calls until
                    # it does (bounds memory per connection; the idle timeout and
                    # send_stall_timeout_s end a peer that never drains).
                    await outbox.wait_for_space()
                idle_earliest = trio.current_time() + idle_s
                if idle_deadline < idle_earliest:
                    idle_deadline = idle.deadline = idle_earliest + idle_s * IDLE_SLACK
                data = await self._receive()
                for index, event in enumerate(conn.receive_data(data), 1):
                    if outbox.queued_bytes > limits.write_buffer_bytes_max:
                        # One read can hold thousands of small calls, each with a large
                        # answer: dispatch no more until the peer takes what is queued.
                        await outbox.wait_for_space()
                    elif index % DISPATCH_BATCH_EVENTS == 0:
                        # Let handlers and the writer run so answers stream out while
                        # the rest of a large read is dispatched (pipelining with the peer).
                        await trio.lowlevel.checkpoint()
                    if type(event) is wire.Call:
                        spec = methods.get(event.method)
                        if spec is None:
                            unknown = f"unknown method {event.method!r}"
                            self._reply_error(event.id, Code.UNIMPLEMENTED, unknown)
                        elif rules is not None and not self._allowed(spec, rules):
                            self._reply_error(
                                event.id,
                                Code.PERMISSION_DENIED,
                                f"{self.identity!r} may not call {spec.name} "
                                f"(needs one of the roles {sorted(rules[spec.name] or ())})",
                                {"not_started": True},
                            )
                        elif spec.idempotent or (event.metadata and KEY_METADATA in event.metadata):
                            if not self._start_keyed(spec, event):
                                nursery.start_soon(self._run_keyed, spec, event)
                        elif not spec.runs_inline:
                            if spec.try_now is None or not self._answered_now(spec, event):
                                nursery.start_soon(self._run_bounded if spec.bounded else self._run_async, spec, event)
                        else:
                            self._run_inline(spec, event)
                    elif type(event) is wire.Cancel:
                        scope = self.scopes.get(event.id)
                        if scope is not None:
                            self.cancelled_by_peer.add(event.id)
                            scope.cancel()
                        elif event.id in self.queued_keyed:
                            self.cancelled_by_peer.add(event.id)  # its handler will not run
                        elif event.id in self.unscoped or event.id in self.later:
                            self.cancelled_by_peer.add(event.id)  # its answer will not be sent
                    elif type(event) is wire.Ping:
                        self.outbox.put_nowait(conn.send_pong(event.nonce))
                    elif type(event) is wire.CallRefused:
                        details = {"not_started": True}
                        self.outbox.put_nowait(conn.send_error(event.id, event.code, event.message, details))
                    elif type(event) is wire.ConnectionClosed:
                        return
                    elif type(event) is wire.GoAway:
                        pass  # the client starts nothing new here; in-flight calls finish
                    # Pong, Hello (rejected by the state machine) need nothing.
                if not self.scopes and not self.unscoped:
                    outbox.write_now()  # nothing else will answer soon: no need to wait for the writer
        if idle.cancelled_caught:
            raise wire.RemoteProtocolError(f"idle for idle_timeout_s ({limits.idle_timeout_s} s)", Code.UNAVAILABLE)

    async def _authenticate(self, security: ServerSecurity, hello: wire.Hello) -> None:
        """Establish the caller's principal from its certificate and the hello's auth;
        a refusal becomes a goaway ``UNAUTHENTICATED`` and the connection closes."""
        stream = self.stream
        peer_cert = stream.getpeercert() if isinstance(stream, trio.SSLStream) else None
        try:
            principal = await security.authenticate(peer_cert, hello.auth)
        except RpcError as exc:
            log.info("connection from %s not authenticated: %s", self.peer, exc.message)
            raise wire.RemoteProtocolError(exc.message, Code.UNAUTHENTICATED) from None
        self.principal = principal
        self.identity = principal.name
        self.roles = principal.roles

    def _allowed(self, spec: MethodSpec, rules: dict[str, frozenset[str] | None]) -> bool:
        try:
            rule = rules[spec.name]
        except KeyError:
            assert self.server.security is not None
            rule = rules[spec.name] = self.server.security.rule_for(spec.name, spec.allow)
        return rule is None or not rule.isdisjoint(self.roles)

    async def _receive(self) -> bytes:
        size = max(RECEIVE_BYTES, min(self.conn.receive_size_hint, RECEIVE_BYTES_MAX))
        try:
            return await self.receiver.receive(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    def _context(self, call: wire.Call, deadline: float) -> CallContext:
        return CallContext(
            call.method,
            call.id,
            deadline,
            call.metadata,
            self.peer,
            self.identity,
            roles=self.roles,
            secured=self.server.security is not None,
        )

    def _deadline(self, call: wire.Call) -> float:
        """The call's deadline on this server: what it carries, capped by call_timeout_max_s."""
        timeout_s = self.limits.call_timeout_max_s
        if call.deadline_s is not None and call.deadline_s < timeout_s:
            timeout_s = call.deadline_s
        return trio.current_time() + timeout_s if math.isfinite(timeout_s) else math.inf

    def _expired(self, call: wire.Call, deadline: float) -> None:
        """The call's scope caught its cancellation: answer DEADLINE_EXCEEDED if it was the
        deadline, else (the peer cancelled or left) drop it silently."""
        if call.id in self.cancelled_by_peer or not self.conn.is_open or not math.isfinite(deadline):
            self.conn.abandon_call(call.id)  # the caller is gone: nothing to send
        else:
            timeout_s = self.limits.call_timeout_max_s if call.deadline_s is None else call.deadline_s
            expired = f"deadline of {min(timeout_s, self.limits.call_timeout_max_s):.3f} s expired on the server"
            self._reply_error(call.id, Code.DEADLINE_EXCEEDED, expired)

    def _run_inline(self, spec: MethodSpec, call: wire.Call) -> None:
        """A plain function, or an ``async def`` that cannot suspend
        (``MethodSpec.never_suspends``): run to completion here, on the read loop, in a
        copy of its context (what the handler sets in context variables stays with the
        call, as it would in a task of its own)."""
        self.server.calls_started += 1
        contextvars.copy_context().run(self._run_inline_here, spec, call)

    def _run_inline_here(self, spec: MethodSpec, call: wire.Call) -> None:
        _current_call.set(self._context(call, self._deadline(call)))
        try:
            value = spec.call_inline(call.args, call.kwargs)
        except Exception as exc:
            self._reply_raised(spec, call, exc)
        else:
            self._reply_result(call.id, value)

    async def _run_async(self, spec: MethodSpec, call: wire.Call) -> None:
        self.server.calls_started += 1
        deadline = self._deadline(call)
        _current_call.set(self._context(call, deadline))
        scope = trio.CancelScope(deadline=deadline)
        self.scopes[call.id] = scope
        try:
            with scope:
                try:
                    value = await spec.fn(*call.args, **call.kwargs)
                except Exception as exc:
                    self._reply_raised(spec, call, exc, write_now=len(self.conn.inflight) == 1)
                    return
                if self.outbox.queued_bytes > self.limits.write_buffer_bytes_max:
                    await self.outbox.wait_for_space()  # backpressure from a slow reader
                # The only call open here: nothing else will answer soon, so write the answer
                # from here, not from a wakeup of the writer task (as the read loop does).
                self._reply_result(call.id, value, write_now=len(self.conn.inflight) == 1)
                return
            # Only reached when the scope caught the cancellation.
            self._expired(call, deadline)
        finally:
            self.scopes.pop(call.id, None)
            self.cancelled_by_peer.discard(call.id)
            self.conn.abandon_call(call.id)  # no-op unless cancelled from outside
            if self._draining and not self.conn.inflight:
                self._close_soon()

    def _answered_now(self, spec: MethodSpec, call: wire.Call) -> bool:
        """Answer ``call`` here on the read loop if ``spec.try_now`` can (no task, no
        scope); False: it must wait, run it as usual."""
        assert spec.try_now is not None
        deadline = self._deadline(call)
        if deadline <= trio.current_time():
            return False  # (the usual path answers DEADLINE_EXCEEDED)
        # In a copy of the read loop's context, as _run_inline: what the method sets in
        # context variables must not stay with the connection's later tasks.
        return contextvars.copy_context().run(self._answered_now_here, spec, call, deadline)

    def _answered_now_here(self, spec: MethodSpec, call: wire.Call, deadline: float) -> bool:
        assert spec.try_now is not None
        _current_call.set(self._context(call, deadline))
        try:
            value = spec.try_now(call.args, call.kwargs)
        except Exception as exc:
            self._reply_raised(spec, call, exc)
        else:
            if value is NOT_NOW:
                return False
            if type(value) is Later:
                self.later.add(call.id)
                value.bind(functools.partial(self._answer_later, call))
            else:
                self._reply_result(call.id, value)
        self.server.calls_started += 1
        self._close_if_drained()
        return True

    def _answer_later(self, call: wire.Call, value: Any, error: Exception | None) -> None:
        """The answer of a call ``try_now`` answered with a :class:`Later` (from the task
        that settled it): sent if someone still waits for it."""
        call_id = call.id
        self.later.discard(call_id)
        if self._answer_wanted(call_id):
            if error is None:
                self._reply_result(call_id, value)
            elif isinstance(error, RpcError):
                self._reply_error(call_id, error.code, error.message, error.details)
            else:
                log.error("call %d (%s) from %s failed", call_id, call.method, self.peer, exc_info=error)
                self._reply_error(call_id, Code.INTERNAL, f"{type(error).__name__}: {error}")
        else:
            self.conn.abandon_call(call_id)
        self.cancelled_by_peer.discard(call_id)
        self._close_if_drained()

    async def _run_bounded(self, spec: MethodSpec, call: wire.Call) -> None:
        """:meth:`_run_async` for a handler that bounds its own waits (``MethodSpec.bounded``):
        without a cancel scope. A call whose deadline passed on the way is answered
        DEADLINE_EXCEEDED without running; one its caller cancelled runs on, unanswered."""
        self.server.calls_started += 1
        deadline = self._deadline(call)
        call_id = call.id
        _current_call.set(self._context(call, deadline))
        self.unscoped.add(call_id)
        try:
            if deadline <= trio.current_time():
                self._expired(call, deadline)
                return
            try:
                value = await spec.fn(*call.args, **call.kwargs)
            except Exception as exc:
                if self._answer_wanted(call_id):
                    self._reply_raised(spec, call, exc, write_now=len(self.conn.inflight) == 1)
                elif not isinstance(exc, (RpcError, TypeError)):  # nobody to tell: the log must say it
                    log.error("handler %s raised (call %d from %s, no longer awaited)", spec.name, call_id, self.peer,
                              exc_info=exc)  # fmt: skip
                return
            if not self._answer_wanted(call_id):
                return
            if self.outbox.queued_bytes > self.limits.write_buffer_bytes_max:
                await self.outbox.wait_for_space()  # backpressure from a slow reader
            self._reply_result(call_id, value, write_now=len(self.conn.inflight) == 1)
        finally:
            self.unscoped.discard(call_id)
            self.cancelled_by_peer.discard(call_id)
            self.conn.abandon_call(call_id)  # no-op unless cancelled or unanswered
            if self._draining and not self.conn.inflight:
                self._close_soon()

    def _answer_wanted(self, call_id: int) -> bool:
        """Is someone still waiting for the answer (not cancelled, the connection open)?"""
        return call_id not in self.cancelled_by_peer and self.conn.is_open and call_id in self.conn.inflight

    def _start_keyed(self, spec: MethodSpec, call: wire.Call) -> bool:
        """A keyed call that can go in one write of the request log (a handler that runs
        inline, on SQLite): started without a task, answered from the log's flusher once
        durable (``IdempotencyDriver.start``). False: it needs ``_run_keyed``."""
        driver = self.server.idempotency
        if driver is None or call.metadata.get(KEY_METADATA) is None:
            return False
        deadline = self._deadline(call)
        context = self._context(call, deadline)
        call_id = call.id
        conn = self.conn
        cancelled = self.cancelled_by_peer

        def wanted() -> bool:
            return conn.is_open and call_id not in cancelled

        def finish(result: Answer | BeginResult) -> None:
            self.queued_keyed.discard(call_id)
            if not isinstance(result, Answer):
                # The key has a row (replay, mismatch, in progress...), or the batch went to
                # a worker thread (our row is in progress): go on in a task.
                self._go_on_keyed(spec, call, context, result)
                return
            if call_id in conn.inflight:  # (else the connection is ending: no one to tell)
                if result is EXPIRED:
                    self._expired(call, deadline)  # (the peer cancelled or left: nothing to send)
                elif result.error is not None:
                    error = result.error
                    self._reply_error(call_id, error.code, error.message, error.details)
                else:
                    self._reply_result(call_id, result.value, result.metadata, result.encoded)
            cancelled.discard(call_id)
            self._close_if_drained()

        if not driver.start(spec, call.method, call.args, call.kwargs, context, wanted, finish):
            return False
        self.queued_keyed.add(call_id)
        self.server.calls_started += 1
        return True

    def _go_on_keyed(self, spec: MethodSpec, call: wire.Call, context: CallContext, begun: BeginResult) -> None:
        nursery = self._nursery
        try:
            if nursery is None:
                raise RuntimeError("the connection has no nursery")
            nursery.start_soon(self._run_keyed, spec, call, context, begun)
        except RuntimeError:  # the connection is over
            self.conn.abandon_call(call.id)
            self.cancelled_by_peer.discard(call.id)
            driver = self.server.idempotency
            if begun.new and driver is not None:
                driver.release_soon(begun.record.identity, begun.record.key, 1)

    async def _run_keyed(
        self,
        spec: MethodSpec,
        call: wire.Call,
        context: CallContext | None = None,
        begun: BeginResult | None = None,
    ) -> None:
        """A call with an idempotency key (or to a method that needs one): see ``_keyed``.
        ``begun``: ``_start_keyed`` began it (``context`` is its)."""
        if begun is None:
            self.server.calls_started += 1
        driver = self.server.idempotency
        if call.metadata.get(KEY_METADATA) is None:
            self._reply_error(
                call.id,
                Code.INVALID_ARGUMENT,
                f"{spec.name} needs an idempotency key (call it with "
                "client.options(idempotency_key=...) or client.options(idempotent=True))",
            )
            self._close_if_drained()
            return
        if driver is None:
            self._reply_error(
                call.id,
                Code.FAILED_PRECONDITION,
                "this server has no request log, so it cannot honour an idempotency key "
                "(serve with a database: `txrpc serve --db URL`); the call did not run",
                {"no_request_log": True},
            )
            self._close_if_drained()
            return
        if not driver.keeper_running and self._nursery is not None:
            # Served without serve_listeners (serve_stream): keep leases from here.
            self._nursery.start_soon(driver.run_lease_keeper)
        if context is None:
            context = self._context(call, self._deadline(call))
        deadline = context.deadline
        _current_call.set(context)
        scope = trio.CancelScope(deadline=deadline)
        self.scopes[call.id] = scope
        try:
            with scope:
                answer = await driver.answer(spec, call.method, call.args, call.kwargs, context, begun)
                if answer.error is not None:
                    error = answer.error
                    self._reply_error(call.id, error.code, error.message, error.details)
                    return
                if self.outbox.queued_bytes > self.limits.write_buffer_bytes_max:
                    await self.outbox.wait_for_space()
                self._reply_result(call.id, answer.value, answer.metadata)
                return
            self._expired(call, deadline)
        finally:
            self.scopes.pop(call.id, None)
            self.cancelled_by_peer.discard(call.id)
            self.conn.abandon_call(call.id)
            if self._draining and not self.conn.inflight:
                self._close_soon()

    def _close_if_drained(self) -> None:
        if self._draining and not self.conn.inflight:
            self._close_soon()

    def _reply_result(
        self,
        call_id: int,
        value: Any,
        metadata: dict[str, Any] | None = None,
        encoded: bytes | None = None,
        *,
        write_now: bool = False,
    ) -> None:
        """Answer with ``value`` — or, given ``encoded`` (``encode_value(value)``, keys
        checked: a keyed call's stored outcome), with those bytes, not encoding it again.
        ``write_now``: see ``Outbox.put_nowait``."""
        try:
            if encoded is None:
                data = self.conn.send_result(call_id, value, metadata)
            else:
                data = self.conn.send_result_encoded(call_id, encoded, metadata)
        except TypeError as exc:
            self._reply_error(call_id, Code.INTERNAL, f"handler returned a value CBOR cannot carry: {exc}")
            return
        except wire.LocalProtocolError as exc:
            self._reply_error(call_id, Code.RESOURCE_EXHAUSTED, f"result too large: {exc}")
            return
        self.outbox.put_nowait(data, write_now)

    def _reply_error(
        self,
        call_id: int,
        code: int,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        write_now: bool = False,
    ) -> None:
        try:
            data = self.conn.send_error(call_id, code, message, details)
        except (TypeError, wire.LocalProtocolError) as exc:
            data = self.conn.send_error(call_id, Code.INTERNAL, f"error could not be encoded: {exc}")
        self.outbox.put_nowait(data, write_now)

    def _reply_raised(self, spec: MethodSpec, call: wire.Call, exc: Exception, *, write_now: bool = False) -> None:
        """Answer a call whose handler raised ``exc``: its own error if an RpcError,
        INVALID_ARGUMENT if its arguments do not fit, else INTERNAL (logged)."""
        if isinstance(exc, RpcError):
            self._reply_error(call.id, exc.code, exc.message, exc.details, write_now=write_now)
        elif isinstance(exc, TypeError):
            self._reply_type_error(spec, call, exc)
        else:
            self._reply_internal(spec, call, exc)

    def _reply_type_error(self, spec: MethodSpec, call: wire.Call, exc: TypeError) -> None:
        problem = spec.arguments_fit(call.args, call.kwargs)
        if problem is not None:
            self._reply_error(call.id, Code.INVALID_ARGUMENT, f"{spec.name}: {problem}")
        else:
            self._reply_internal(spec, call, exc)

    def _reply_internal(self, spec: MethodSpec, call: wire.Call, exc: BaseException) -> None:
        log.error("handler %s raised (call %d from %s)", spec.name, call.id, self.peer, exc_info=exc)
        self._reply_error(call.id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")


async def serve(
    *services: Service,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: Limits | None = None,
    request_log: RequestLog | Storage | None = None,
    security: ServerSecurity | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``host:port`` until cancelled (see :class:`Server`)."""
    server = Server(*services, limits=limits, request_log=request_log, security=security)
    await server.serve_tcp(host, port, task_status=task_status)
