"""Services, method registration and the per-call context."""

from __future__ import annotations

import contextvars
import dataclasses
import dis
import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar, overload

import trio

if TYPE_CHECKING:
    from storage import KvTransaction

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(slots=True)
class CallContext:
    """What a handler knows about the call it is serving (``txrpc.current_call()``).

    ``deadline`` is in ``trio.current_time()`` units (``math.inf`` if none); the handler
    already runs inside a cancel scope with that deadline, so calls it makes to other
    services inherit what remains.

    A call carrying an idempotency key, served with a request log, also has
    ``idempotency_key``, ``attempt`` (1 for the first executor, +1 per take-over)
    and :attr:`store`.
    """

    method: str
    call_id: int
    deadline: float
    metadata: dict[str, Any]
    peer: str
    identity: str = "anonymous"
    idempotency_key: str | None = None
    roles: frozenset[str] = frozenset()
    """The caller's roles (from its certificate or token; empty when security is off)."""
    secured: bool = False
    """True when the server authenticates callers (``Server(security=...)``): ``identity``
    and ``roles`` are then established, not assumed."""
    attempt: int = 0
    _store_factory: Callable[[], KvTransaction] | None = None
    _store: KvTransaction | None = None

    @property
    def store(self) -> KvTransaction:
        """The request's own store transaction (a ``storage.KvTransaction``).

        Its writes commit in the same database transaction as the request-log record
        of this call's outcome, or not at all: a retry replays the outcome and never
        applies them twice (exactly-once). If a value read here changed before the
        outcome is recorded (``WriteConflict``), the server runs the handler again on a
        fresh transaction. Only for calls with an idempotency key on a server with a
        request log; raises ``RuntimeError`` otherwise.
        """
        if self._store is None:
            if self._store_factory is None:
                raise RuntimeError(
                    "current_call().store needs a call with an idempotency key on a server "
                    "with a request log (txrpc.Server(..., request_log=...))"
                )
            self._store = self._store_factory()
        return self._store

    def remaining_s(self) -> float:
        """Seconds left before the deadline (``math.inf`` if none)."""
        return self.deadline - trio.current_time() if math.isfinite(self.deadline) else math.inf


_current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("txrpc_current_call", default=None)


def current_call() -> CallContext:
    """The :class:`CallContext` of the call being served; raises ``RuntimeError`` outside one."""
    context = _current_call.get()
    if context is None:
        raise RuntimeError("txrpc.current_call() is only available inside a handler")
    return context


NOT_NOW: Any = object()
"""``MethodSpec.try_now``'s answer when the call must wait: run it in a task."""


class Later:
    """``MethodSpec.try_now``'s answer when the value will come from a callback (a queued
    durable write's, say) rather than a task: the server binds its reply to it, and the
    method calls :meth:`resolve` or :meth:`fail` exactly once, from any task."""

    __slots__ = ("_outcome", "_reply")

    def __init__(self) -> None:
        self._reply: Callable[[Any, Exception | None], None] | None = None
        self._outcome: tuple[Any, Exception | None] | None = None

    def bind(self, reply: Callable[[Any, Exception | None], None]) -> None:
        self._reply = reply
        if self._outcome is not None:
            reply(*self._outcome)

    def resolve(self, value: Any) -> None:
        self._settle(value, None)

    def fail(self, error: Exception) -> None:
        self._settle(None, error)

    def _settle(self, value: Any, error: Exception | None) -> None:
        if self._outcome is not None:
            raise RuntimeError("a Later is settled once")
        self._outcome = (value, error)
        if self._reply is not None:
            self._reply(value, error)


def _current_call_or_none() -> CallContext | None:
    return _current_call.get()


@dataclasses.dataclass(slots=True)
class MethodSpec:
    """A registered handler and how to run it."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    idempotent: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    allow: frozenset[str] | None = None
    """Roles allowed to call the method (any one suffices); None: every authenticated
    caller. Enforced by a server with ``security=`` (``specs/security.md``)."""
    never_suspends: bool = False
    """An ``async def`` whose body has no ``await``, ``async for`` or ``async with``:
    it cannot suspend, so the server runs it to completion on the spot, like a plain
    function, without a task and a cancel scope of its own."""
    bounded: bool = False
    """The handler bounds every wait of its own (``add_method(..., bounded=True)``): the
    server runs it without a cancel scope of its own (entering and leaving one costs
    about an eighth of a small call). Neither the call's deadline nor the caller's
    ``cancel`` interrupts it: the caller's own deadline still ends the call for the
    caller, and an answer to a cancelled call is dropped. Closing the connection
    cancels it once what is queued is written (at the latest after the close's flush time)."""
    try_now: Callable[[Any, dict[str, Any]], Any] | None = None
    """Optional: the call's answer now, without a task, if it needs no wait (the server
    calls it on the read loop, with the call's context set); ``NOT_NOW`` if it would
    have to wait -- having undone whatever it did -- and the call then runs as usual.
    (A transactional method that waits only on its transaction: its operations usually
    find their locks free.)"""
    _signature: inspect.Signature | None = None

    @property
    def runs_inline(self) -> bool:
        """A plain function or an ``async def`` that never suspends: it runs to
        completion without yielding to the event loop."""
        return self.never_suspends or not self.is_async

    def call_inline(self, args: Iterable[Any], kwargs: dict[str, Any]) -> Any:
        """Run a handler that :attr:`runs_inline` to completion; its value (or what it raised)."""
        value = self.fn(*args, **kwargs)
        if self.never_suspends:
            try:
                value.send(None)
            except StopIteration as done:
                return done.value
            value.close()  # cannot happen: the code has no suspension point
            raise RuntimeError(f"{self.name} suspended although its code cannot")
        return value

    def arguments_fit(self, args: Iterable[Any], kwargs: dict[str, Any]) -> str | None:
        """None when ``args``/``kwargs`` bind to the handler, else why they do not."""
        if self._signature is None:
            try:
                self._signature = inspect.signature(self.fn)
            except (TypeError, ValueError):
                return None
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            return str(exc)
        return None


def _roles(roles: Iterable[str]) -> frozenset[str]:
    if isinstance(roles, str):
        raise TypeError(f"allow takes a collection of role names, not the string {roles!r}")
    out = frozenset(roles)
    if not out or not all(type(r) is str and r for r in out):
        raise ValueError("allow must name at least one role")
    return out


_SUSPENDING_OPCODES = frozenset(
    name for name in ("YIELD_VALUE", "SEND", "GET_AWAITABLE", "GET_AITER", "GET_ANEXT", "BEFORE_ASYNC_WITH")
    if name in dis.opmap
)


def _never_suspends(fn: Callable[..., Any]) -> bool:
    """True only for a plain ``async def`` function (or a method of one) whose own code
    has no suspension point. Anything else (partials, callable objects, decorated
    wrappers, generators) is not inspected and answers False."""
    target = getattr(fn, "__func__", fn)  # a bound method: its function
    if not inspect.iscoroutinefunction(target) or not hasattr(target, "__code__"):
        return False
    if getattr(target, "__wrapped__", None) is not None:
        return False  # a decorator may hide awaits in what it wraps
    code = target.__code__
    if not code.co_flags & inspect.CO_COROUTINE:
        return False
    return not any(ins.opname in _SUSPENDING_OPCODES for ins in dis.get_instructions(code))


def _is_async(fn: Callable[..., Any]) -> bool:
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    call_method = type(target).__dict__.get("__call__") if not inspect.isroutine(target) else None
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call_method)


class Service:
    """A named group of methods.

    ``Service("calc")`` with a method ``add`` answers ``calc.add``; ``Service()`` (no
    name) answers ``add``. ``allow`` (roles, e.g. ``txrpc.ROLE_PEER``) is the default
    rule of its methods: only callers holding one of them may call (on a server with
    ``security=``; others get ``PERMISSION_DENIED``). Handlers may be ``async def`` (each call runs in its own
    task) or plain functions (run inline on the event loop: they must not block).
    """

    def __init__(self, name: str = "", *, allow: Iterable[str] | None = None) -> None:
        if name and (not name.replace("_", "a").replace(".", "a").isalnum() or name.startswith(".")):
            raise ValueError(f"service name {name!r} must be dotted identifiers")
        self.name = name
        self.allow: frozenset[str] | None = None if allow is None else _roles(allow)
        self.methods: dict[str, MethodSpec] = {}

    def qualified(self, method: str) -> str:
        return f"{self.name}.{method}" if self.name else method

    @overload
    def method(self, fn: F, /) -> F: ...

    @overload
    def method(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        idempotent: bool = False,
        allow: Iterable[str] | None = None,
        **options: Any,
    ) -> Callable[[F], F]: ...

    def method(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        idempotent: bool = False,
        allow: Iterable[str] | None = None,
        **options: Any,
    ) -> F | Callable[[F], F]:
        """Register a handler: ``@service.method`` or ``@service.method(name=..., idempotent=True)``.

        ``idempotent=True`` makes an idempotency key mandatory for the method (the
        server needs a request log for that; see ``specs/guarantees.md``).
        ``allow=ROLES`` lets only callers holding one of the roles call it (default: the
        service's ``allow``).
        """

        def register(function: F) -> F:
            self.add_method(function, name=name, idempotent=idempotent, allow=allow, **options)
            return function

        if fn is not None:
            return register(fn)
        return register

    def transactional(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        allow: Iterable[str] | None = None,
        **options: Any,
    ) -> F | Callable[[F], F]:
        """Register a transactional method: ``async def m(tx, *args)``.

        Served by a shard (``txrpc shard``): ``tx`` is the transaction handle
        (``await tx.get(key)``, ``await tx.put(key, value)``, ``await tx.delete(key)``,
        ``tx.scan(prefix)``) bound to the caller's transaction; raise ``txrpc.Abort``
        to vote no. Called outside a transaction, the method runs as its own
        single-shard transaction.
        """

        def register(function: F) -> F:
            if not _is_async(function):
                raise TypeError(f"transactional method {function.__name__} must be async def")
            self.add_method(function, name=name, transactional=True, allow=allow, **options)
            return function

        if fn is not None:
            return register(fn)
        return register

    def add_method(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        idempotent: bool = False,
        allow: Iterable[str] | None = None,
        **options: Any,
    ) -> MethodSpec:
        method_name = name or getattr(fn, "__name__", None)
        if not method_name or method_name == "<lambda>":
            raise ValueError("a method needs a name: pass name=...")
        qualified = self.qualified(method_name)
        if qualified in self.methods:
            raise ValueError(f"method {qualified!r} is registered twice")
        rule = self.allow if allow is None else _roles(allow)
        bounded = bool(options.pop("bounded", False))
        spec = MethodSpec(qualified, fn, _is_async(fn), idempotent, dict(options), rule, _never_suspends(fn), bounded)
        self.methods[qualified] = spec
        return spec

    def __repr__(self) -> str:
        return f"Service({self.name!r}, methods={sorted(self.methods)})"
