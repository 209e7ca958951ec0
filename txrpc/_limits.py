"""Every bound in one place, with units in the names and documented defaults."""

from __future__ import annotations

import dataclasses
import math

KiB = 1024
MiB = 1024 * KiB


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Bounds for a connection, a server or a client. Each has a name with its unit.

    A limit that trips is an explicit error (``RESOURCE_EXHAUSTED``, ``PROTOCOL_ERROR``,
    ``DEADLINE_EXCEEDED`` or a closed connection with a goaway saying why), never a
    hang or an unbounded buffer. The defaults are the ones in ``specs/wire.md``.
    """

    frame_bytes_max: int = 16 * MiB
    """Largest frame body accepted or sent (the length prefix is checked first)."""
    cbor_depth_max: int = 64
    """Deepest nesting of arrays/maps in one decoded message."""
    calls_inflight_max: int = 4096
    """Calls one connection may have running on the server at once."""
    connections_max: int = 1024
    """Connections a server holds at once; more are told goaway and closed."""
    handshake_timeout_s: float = 10.0
    """Time a new connection has to complete the hello exchange."""
    idle_timeout_s: float = 300.0
    """A server closes a connection that has sent nothing (not even a ping) for this long
    (never sooner; up to 1/16 of it later)."""
    keepalive_interval_s: float = 30.0
    """A client pings an otherwise idle connection this often."""
    keepalive_timeout_s: float = 20.0
    """A ping unanswered for this long marks the connection dead."""
    write_buffer_bytes_max: int = 8 * MiB
    """Outgoing bytes queued per connection before senders wait (backpressure)."""
    shutdown_grace_s: float = 10.0
    """How long a graceful shutdown waits for in-flight calls before cancelling them."""
    connect_timeout_s: float = 10.0
    """Bound on opening a connection and completing the hello exchange (client)."""
    reconnect_backoff_s: float = 0.05
    """First delay before reconnecting after a failure; doubles per failure."""
    reconnect_backoff_max_s: float = 2.0
    """Largest delay between reconnection attempts."""
    retries_max: int = 3
    """Attempts after the first for a call that is known to be safe to retry."""
    call_timeout_max_s: float = math.inf
    """A server runs no call longer than this, whatever deadline it carries (or none):
    past it the handler is cancelled and the caller told ``DEADLINE_EXCEEDED``. Bounds
    how long a call can hold resources (a shard node sets 300 s: a transaction's locks).
    Unbounded by default (a call without a deadline runs until it returns)."""
    send_stall_timeout_s: float = 60.0
    """A server closes a connection whose peer accepts none of a pending write for this
    long (a reader that never drains its replies)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value < 0 or (value == 0 and field.name != "retries_max"):
                raise ValueError(f"Limits.{field.name} must be positive, got {value!r}")
        if self.frame_bytes_max > 2**31 - 1:
            raise ValueError("Limits.frame_bytes_max must fit the 4-byte length prefix")

    def replace(self, **changes: float) -> Limits:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
