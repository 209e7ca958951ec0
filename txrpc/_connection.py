"""The wire protocol as a state machine, without I/O (h11-style).

Feed received bytes to :meth:`Connection.receive_data` and get events back; call the
``send_*`` methods and get bytes to write. Nothing here knows about trio, sockets,
clocks or threads, so the same object runs over TCP, TLS, in-memory streams and in
the simulator. A peer that breaks the rules raises :class:`RemoteProtocolError`; this
side breaking them raises :class:`LocalProtocolError`.

Message shapes are specified in ``specs/wire.md`` and ``specs/wire.cddl``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from ._codec import (
    PREFIX_BYTES,
    FrameDecoder,
    FrameError,
    ValueDecoder,
    check_keys,
    encode_frame,
    encode_value,
    has_large_bytes,
)
from ._errors import Code
from ._limits import Limits

# A result message {"t": 2, "i": id, "r": value[, "md": metadata]}, as cbor2 writes it:
# its map head and first keys, for results whose value is already encoded.
_RESULT_HEAD = bytes([0xA3]) + encode_value("t") + encode_value(2) + encode_value("i")
_RESULT_HEAD_MD = bytes([0xA4]) + encode_value("t") + encode_value(2) + encode_value("i")
_RESULT_KEY = encode_value("r")
_METADATA_KEY = encode_value("md")

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
"""Protocol versions this implementation speaks, newest last."""

CALL_ID_MAX = 2**63 - 1
METHOD_BYTES_MAX = 256
FRAME_BYTES_MIN = 1024
"""The smallest ``frame_bytes_max`` a peer may announce: room for any hello, goaway or
short error this side must be able to send it."""
GOAWAY_MESSAGE_BYTES_MAX = 512
"""A goaway's message is cut to this (it may quote the peer's bad input)."""


class Kind(enum.IntEnum):
    HELLO = 0
    CALL = 1
    RESULT = 2
    ERROR = 3
    CANCEL = 4
    PING = 5
    PONG = 6
    GOAWAY = 7


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"  # nothing agreed yet
    OPEN = "open"  # calls flow
    CLOSED = "closed"  # EOF seen or close() called


class LocalProtocolError(Exception):
    """This side tried something the protocol forbids in the current state."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol; ``code`` and ``message`` go in the goaway."""

    def __init__(self, message: str, code: Code = Code.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- events -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """Opens a connection. The client lists versions; the server answers with one."""

    versions: tuple[int, ...]
    limits: dict[str, int]
    auth: Any = None
    agent: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    id: int
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    deadline_s: float | None  # seconds remaining when sent, None = no deadline
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    id: int
    value: Any
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    id: int
    code: int
    message: str
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Cancel:
    id: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclasses.dataclass(frozen=True, slots=True)
class GoAway:
    """The sender takes no call with an id above ``last_id``; those never ran."""

    last_id: int
    code: int
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side (EOF)."""


@dataclasses.dataclass(frozen=True, slots=True)
class CallRefused:
    """A call the server must refuse without running (over ``calls_inflight_max``,
    or arriving after this side's goaway). Answer it with :meth:`Connection.send_error`."""

    id: int
    code: int
    message: str


Event = Hello | Call | Result | Error | Cancel | Ping | Pong | GoAway | ConnectionClosed | CallRefused


# --- parsing helpers ----------------------------------------------------------------


def _truncate_utf8(text: str, bytes_max: int) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= bytes_max:
        return text
    return raw[: max(0, bytes_max - 3)].decode("utf-8", "ignore") + "..."


def _seconds(value: Any) -> float | None:
    """``value`` as a finite, non-negative number of seconds, or None if it is not one."""
    if type(value) not in (int, float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond the float range
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _uint(message: dict[str, Any], key: str, what: str, high: int = CALL_ID_MAX) -> int:
    value = message.get(key)
    if type(value) is not int or not 0 <= value <= high:
        raise RemoteProtocolError(f"{what}: field {key!r} must be an integer in 0..{high}")
    return value


def _text(message: dict[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = message.get(key, default)
    if type(value) is not str:
        raise RemoteProtocolError(f"{what}: field {key!r} must be a text string")
    return value


def _text_map(message: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    value = message.get(key)
    if value is None:
        return {}
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise RemoteProtocolError(f"{what}: field {key!r} must be a map with text keys")
    return value


_KNOWN_KEYS: dict[int, frozenset[str]] = {
    Kind.HELLO: frozenset({"t", "v", "l", "auth", "agent"}),
    Kind.CALL: frozenset({"t", "i", "m", "a", "k", "d", "md"}),
    Kind.RESULT: frozenset({"t", "i", "r", "md"}),
    Kind.ERROR: frozenset({"t", "i", "c", "msg", "x"}),
    Kind.CANCEL: frozenset({"t", "i"}),
    Kind.PING: frozenset({"t", "n"}),
    Kind.PONG: frozenset({"t", "n"}),
    Kind.GOAWAY: frozenset({"t", "last", "c", "msg"}),
}


class Connection:
    """One side of one txrpc connection.

    Client flow: ``send_hello()`` → receive :class:`Hello` → OPEN → ``send_call`` …
    Server flow: receive :class:`Hello` → ``send_hello()`` → OPEN → answer calls.
    ``inflight`` holds the ids of calls that are open on this connection (sent and not
    answered, on a client; received and not answered, on a server).
    """

    def __init__(self, role: Role, limits: Limits | None = None) -> None:
        self.role = role
        self.limits = limits or Limits()
        self.state = State.AWAIT_HELLO
        self.version: int | None = None
        self.peer_hello: Hello | None = None
        self.peer_limits: dict[str, int] = {}
        #: A length every frame may have whatever the peer says (hello carries at least
        #: FRAME_BYTES_MIN): a frame below it needs no look at the peer's limits.
        self._frame_bytes_max_out = min(FRAME_BYTES_MIN, self.limits.frame_bytes_max)
        self.inflight: set[int] = set()
        self.local_goaway: GoAway | None = None
        self.remote_goaway: GoAway | None = None
        self._hello_sent = False
        self._next_id = 1
        self._highest_received_id = 0
        self._decoder = FrameDecoder(self.limits.frame_bytes_max)
        self._value_decoder = ValueDecoder(self.limits.cbor_depth_max)

    # --- state queries ------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state is State.OPEN

    @property
    def accepts_calls(self) -> bool:
        """A client may start a new call here (open, and neither side said goaway)."""
        return self.state is State.OPEN and self.remote_goaway is None and self.local_goaway is None

    def _frame_limit_to_peer(self) -> int:
        # Never send more than the peer said it accepts, nor more than we would.
        peer_max = self.peer_limits.get("frame_bytes_max", self.limits.frame_bytes_max)
        return min(peer_max, self.limits.frame_bytes_max)

    def _encode(self, message: dict[str, Any], large: bool = False) -> bytes:
        data, length = encode_frame(message, large)
        if length > self._frame_bytes_max_out and length > self._frame_limit_to_peer():
            raise LocalProtocolError(
                f"message of {length} bytes exceeds frame_bytes_max {self._frame_limit_to_peer()}"
            )
        return data

    # --- sending ------------------------------------------------------------------

    def send_hello(self, auth: Any = None, agent: str = "txrpc-py") -> bytes:
        if self._hello_sent or self.state is State.CLOSED:
            raise LocalProtocolError("hello already sent")
        limits = {
            "frame_bytes_max": self.limits.frame_bytes_max,
            "calls_inflight_max": self.limits.calls_inflight_max,
        }
        message: dict[str, Any] = {"t": Kind.HELLO.value, "l": limits, "agent": agent}
        if self.role is Role.CLIENT:
            message["v"] = list(PROTOCOL_VERSIONS)
            if auth is not None:
                message["auth"] = auth
        else:
            if self.peer_hello is None or self.version is None:
                raise LocalProtocolError("a server answers hello only after receiving one")
            message["v"] = [self.version]
        self._hello_sent = True
        data = self._encode(message)
        if self.role is Role.SERVER:
            self.state = State.OPEN
        return data

    def next_call_id(self) -> int:
        call_id = self._next_id
        self._next_id += 1
        return call_id

    def send_call(
        self,
        call_id: int,
        method: str,
        args: list[Any] | tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        deadline_s: float | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> bytes:
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends calls")
        # The peer answers a malformed call with a goaway that ends every call on the
        # connection: refuse it here instead.
        if type(call_id) is not int or not 0 < call_id <= CALL_ID_MAX:
            raise LocalProtocolError(f"call id must be an integer in 1..{CALL_ID_MAX}, got {call_id!r}")
        if type(method) is not str or not 0 < len(method) <= METHOD_BYTES_MAX:
            raise LocalProtocolError(f"method name must be 1..{METHOD_BYTES_MAX} characters: {method!r:.80}")
        if metadata and not all(type(k) is str for k in metadata):
            raise LocalProtocolError("metadata keys must be text strings")
        if deadline_s is not None and math.isnan(deadline_s):
            raise LocalProtocolError("deadline_s is NaN")
        if not self.accepts_calls:
            raise LocalProtocolError(f"connection does not accept calls (state {self.state.value})")
        if call_id in self.inflight:
            raise LocalProtocolError(f"call id {call_id} is already in flight")
        check_keys(args)
        if kwargs:
            check_keys(kwargs)
        message: dict[str, Any] = {"t": 1, "i": call_id, "m": method, "a": list(args)}
        if kwargs:
            message["k"] = kwargs
        if deadline_s is not None and deadline_s != math.inf:
            message["d"] = max(0.0, float(deadline_s))
        if metadata:
            message["md"] = metadata
        data = self._encode(message, has_large_bytes(args))
        self.inflight.add(call_id)
        return data

    def send_result(self, call_id: int, value: Any, metadata: dict[str, Any] | None = None) -> bytes:
        self._finish(call_id)
        if isinstance(value, (dict, list, tuple, set, frozenset)):
            check_keys(value)
        message: dict[str, Any] = {"t": 2, "i": call_id, "r": value}
        if metadata:
            message["md"] = metadata
        return self._encode(message, has_large_bytes(value))

    def send_result_encoded(self, call_id: int, encoded: bytes, metadata: dict[str, Any] | None = None) -> bytes:
        """:meth:`send_result` for a value already encoded (``encode_value(value)``, its
        keys checked): the same bytes, without encoding the value a second time (a keyed
        call's outcome is encoded for the request log anyway)."""
        self._finish(call_id)
        parts = [_RESULT_HEAD_MD if metadata else _RESULT_HEAD, encode_value(call_id), _RESULT_KEY, encoded]
        if metadata:
            parts += (_METADATA_KEY, encode_value(metadata))
        body = b"".join(parts)
        if len(body) > self._frame_limit_to_peer():
            raise LocalProtocolError(
                f"message of {len(body)} bytes exceeds frame_bytes_max {self._frame_limit_to_peer()}"
            )
        return len(body).to_bytes(PREFIX_BYTES, "big") + body

    def send_error(
        self, call_id: int, code: int, message: str, details: dict[str, Any] | None = None
    ) -> bytes:
        self._finish(call_id, refused_ok=True)
        out: dict[str, Any] = {"t": 3, "i": call_id, "c": int(code), "msg": message}
        if details:
            out["x"] = details
        return self._encode(out)

    def _finish(self, call_id: int, refused_ok: bool = False) -> None:
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only a server answers calls")
        if call_id in self.inflight:
            self.inflight.discard(call_id)
        elif not refused_ok:
            raise LocalProtocolError(f"call id {call_id} is not in flight")

    def abandon_call(self, call_id: int) -> None:
        """Server: stop tracking a call without answering (the caller cancelled it or
        the connection is ending)."""
        self.inflight.discard(call_id)

    def send_cancel(self, call_id: int) -> bytes:
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only a client cancels calls")
        self.inflight.discard(call_id)
        return self._encode({"t": 4, "i": call_id})

    def forget_call(self, call_id: int) -> None:
        """Client: stop tracking a call (cancelled, or its connection is gone)."""
        self.inflight.discard(call_id)

    def send_ping(self, nonce: int) -> bytes:
        return self._encode({"t": 5, "n": nonce})

    def send_pong(self, nonce: int) -> bytes:
        return self._encode({"t": 6, "n": nonce})

    def send_goaway(self, code: int = 0, message: str = "") -> bytes:
        """Say this side takes no new calls (server) or starts none (client)."""
        last_id = self._highest_received_id if self.role is Role.SERVER else 0
        # Leave room for the other fields (~30 bytes) within the peer's frame limit.
        message = _truncate_utf8(message, min(GOAWAY_MESSAGE_BYTES_MAX, self._frame_limit_to_peer() - 64))
        self.local_goaway = GoAway(last_id, int(code), message)
        return self._encode({"t": 7, "last": last_id, "c": int(code), "msg": message})

    def close(self) -> None:
        self.state = State.CLOSED

    # --- receiving ----------------------------------------------------------------

    @property
    def receive_size_hint(self) -> int:
        """How many bytes the frame in progress still needs (0 if none)."""
        return self._decoder.bytes_wanted

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes (``b""`` means EOF); return the events they complete."""
        if self.state is State.CLOSED:
            return []
        if not data:
            self.state = State.CLOSED
            if self._decoder.buffered_bytes:
                raise RemoteProtocolError(
                    f"connection closed inside a frame ({self._decoder.buffered_bytes} bytes buffered)"
                )
            return [ConnectionClosed()]
        try:
            bodies = self._decoder.feed(data)
        except FrameError as exc:
            raise RemoteProtocolError(str(exc)) from None
        events: list[Event] = []
        decode = self._value_decoder.decode
        for body in bodies:
            try:
                message = decode(body)
            except FrameError as exc:
                raise RemoteProtocolError(str(exc)) from None
            events.append(self._interpret(message))
        return events

    def _interpret(self, message: Any) -> Event:
        if type(message) is not dict:
            raise RemoteProtocolError(f"a message must be a CBOR map, got {type(message).__name__}")
        kind = message.get("t")
        if type(kind) is not int or kind not in _KNOWN_KEYS:
            raise RemoteProtocolError(f"unknown message kind {kind!r}")
        extra = message.keys() - _KNOWN_KEYS[kind]
        if extra:
            raise RemoteProtocolError(f"{Kind(kind).name.lower()}: unknown fields {sorted(map(str, extra))}")
        # Before hello only hello is legal, except a goaway: a server refusing the
        # connection (connections_max, shutting down) says why before it closes.
        if self.state is State.AWAIT_HELLO and kind != Kind.HELLO and kind != Kind.GOAWAY:
            raise RemoteProtocolError(f"expected hello first, got {Kind(kind).name.lower()}")
        if kind == Kind.CALL:
            return self._on_call(message)
        if kind == Kind.RESULT or kind == Kind.ERROR:
            return self._on_answer(kind, message)
        if kind == Kind.HELLO:
            return self._on_hello(message)
        if kind == Kind.CANCEL:
            if self.role is not Role.SERVER:
                raise RemoteProtocolError("a server does not send cancel")
            return Cancel(_uint(message, "i", "cancel"))
        if kind == Kind.PING:
            return Ping(_uint(message, "n", "ping"))
        if kind == Kind.PONG:
            return Pong(_uint(message, "n", "pong"))
        last_id = _uint(message, "last", "goaway")
        goaway = GoAway(last_id, _uint(message, "c", "goaway", 2**32), _text(message, "msg", "goaway"))
        self.remote_goaway = goaway
        return goaway

    def _on_hello(self, message: dict[str, Any]) -> Hello:
        if self.state is not State.AWAIT_HELLO or self.peer_hello is not None:
            raise RemoteProtocolError("second hello on one connection")
        versions = message.get("v")
        if (
            type(versions) is not list
            or not versions
            or len(versions) > 16
            or not all(type(v) is int and 0 <= v < 2**16 for v in versions)
        ):
            raise RemoteProtocolError("hello: field 'v' must be a non-empty list of versions")
        limits = _text_map(message, "l", "hello")
        if not all(type(v) is int and v > 0 for v in limits.values()):
            raise RemoteProtocolError("hello: limits must be positive integers")
        if limits.get("frame_bytes_max", FRAME_BYTES_MIN) < FRAME_BYTES_MIN:
            raise RemoteProtocolError(f"hello: limits.frame_bytes_max must be at least {FRAME_BYTES_MIN}")
        agent = _text(message, "agent", "hello", "")
        hello = Hello(tuple(versions), limits, message.get("auth"), agent)
        common = sorted(set(versions) & set(PROTOCOL_VERSIONS))
        if not common:
            raise RemoteProtocolError(
                f"no common protocol version: peer speaks {sorted(versions)}, "
                f"this side speaks {list(PROTOCOL_VERSIONS)}",
                Code.FAILED_PRECONDITION,
            )
        if self.role is Role.CLIENT:
            if not self._hello_sent:
                raise RemoteProtocolError("server sent hello before the client did")
            if len(versions) != 1:
                raise RemoteProtocolError("server hello must name exactly one version")
            self.state = State.OPEN
        self.version = common[-1]
        self.peer_hello = hello
        self.peer_limits = limits
        return hello

    def _on_call(self, message: dict[str, Any]) -> Call | CallRefused:
        if self.role is not Role.SERVER:
            raise RemoteProtocolError("a server does not send calls")
        call_id = _uint(message, "i", "call")
        if call_id == 0:
            raise RemoteProtocolError("call: id 0 is reserved")
        method = message.get("m")
        if type(method) is not str or not 0 < len(method) <= METHOD_BYTES_MAX:
            raise RemoteProtocolError(
                f"call: field 'm' must be a method name of 1..{METHOD_BYTES_MAX} characters"
            )
        args = message.get("a")
        if type(args) is not list:
            raise RemoteProtocolError("call: field 'a' must be an array")
        kwargs = _text_map(message, "k", "call")
        deadline = message.get("d")
        deadline_s = None if deadline is None else _seconds(deadline)
        if deadline is not None and deadline_s is None:
            raise RemoteProtocolError("call: field 'd' must be a non-negative number of seconds")
        metadata = _text_map(message, "md", "call")
        if call_id in self.inflight:
            raise RemoteProtocolError(f"call: id {call_id} is already in flight")
        if call_id > self._highest_received_id:
            self._highest_received_id = call_id
        if self.local_goaway is not None:
            return CallRefused(call_id, Code.UNAVAILABLE, "server is shutting down; call not started")
        if len(self.inflight) >= self.limits.calls_inflight_max:
            return CallRefused(
                call_id,
                Code.RESOURCE_EXHAUSTED,
                f"calls_inflight_max ({self.limits.calls_inflight_max}) calls already running on this connection",
            )
        self.inflight.add(call_id)
        return Call(call_id, method, args, kwargs, deadline_s, metadata)

    def _on_answer(self, kind: int, message: dict[str, Any]) -> Result | Error:
        if self.role is not Role.CLIENT:
            raise RemoteProtocolError("a client does not send results or errors")
        call_id = _uint(message, "i", "answer")
        # An answer to a call we cancelled or forgot is legal (it crossed our cancel);
        # the driver drops answers whose id it no longer waits for.
        self.inflight.discard(call_id)
        if kind == Kind.RESULT:
            if "r" not in message:
                raise RemoteProtocolError("result: field 'r' is missing")
            return Result(call_id, message["r"], _text_map(message, "md", "result"))
        details = _text_map(message, "x", "error")
        return Error(call_id, _uint(message, "c", "error", 2**32), _text(message, "msg", "error"), details)
