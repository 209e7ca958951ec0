"""Idempotency decisions, sans-IO: no trio, no database, no clock.

The server's driver looks up (or inserts) the request-log row for a call's
(identity, idempotency key) and hands the row, the call's fingerprint and ``now`` to
:func:`decide`, which answers with one of five small decisions::

    no row ........................................ Run
    row with another fingerprint .................. Mismatch   (whatever its state)
    completed row, same fingerprint ............... Replay     (response or error)
    in-progress row, lease ends after now ......... InProgress (retry_after_s)
    in-progress row, lease ended at or before now . TakeOver   (attempt_seen)

The mismatch check comes first, so a reused key never leaks another payload's
outcome and never waits on another payload's execution. The driver then acts:
``Run`` → execute and complete; ``Replay`` → send the stored outcome;
``Mismatch`` / ``InProgress`` → send :meth:`Mismatch.to_error` /
:meth:`InProgress.to_error`; ``TakeOver`` → ``request_log.take_over(...,
attempt_seen, ...)`` and, if it wins, execute; if it loses, look again.

:func:`fingerprint` is what makes "the same payload" precise: a 16-byte BLAKE2b
digest of the canonical CBOR of ``[method, args, kwargs]``. Map key order does not
matter (canonical CBOR sorts keys); types do (``1`` and ``1.0`` and ``True`` differ,
as do a positional and a keyword argument), and the digest is stable across
processes, machines and Python hash seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Generic, Protocol, TypeVar

from ._codec import canonical, encode_value
from ._errors import IdempotencyKeyMismatch, InvalidArgument, RequestInProgress

FINGERPRINT_BYTES: Final = 16
KEY_CHARS_MAX: Final = 255
_PERSON: Final = b"txrpc.idem.v1"  # domain separation: a digest of this and nothing else

STATE_IN_PROGRESS: Final = "in_progress"
STATE_COMPLETED: Final = "completed"


def canonical_request(method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
    """The canonical CBOR of ``[method, args, kwargs]``: the bytes a fingerprint digests,
    and what the request log stores so ``txrpc replay`` can re-issue the call.

    Raises ``TypeError`` if the arguments are not CBOR-encodable.
    """
    request = [method, list(args), dict(kwargs)]
    if len(kwargs) <= 1 and _all_plain(args) and (not kwargs or (_text_keys(kwargs) and _all_plain(kwargs.values()))):
        # Nothing to sort and no float to shorten: cbor2's plain encoding is the
        # canonical one, byte for byte, at half the cost (property-tested).
        return encode_value(request)
    try:
        return canonical(request)
    except Exception as exc:  # cbor2 raises its own encode error types
        raise TypeError(f"call arguments cannot be fingerprinted (not CBOR-encodable): {exc}") from None


_INT_LIMIT: Final = 1 << 64


_PLAIN_TYPES: Final = frozenset({str, bytes, bool, type(None)})


def _text_keys(mapping: Mapping[Any, Any]) -> bool:
    return all(type(key) is str for key in mapping)


def _all_plain(values: Iterable[Any]) -> bool:
    """Whether every value's plain CBOR is canonical: a string, byte string, bool, None,
    an integer CBOR holds without a bignum tag, or a list or tuple of such scalars."""
    for value in values:
        kind = type(value)
        if kind in _PLAIN_TYPES or (kind is int and -_INT_LIMIT < value < _INT_LIMIT):
            continue
        if kind is not list and kind is not tuple:
            return False
        for item in value:
            kind = type(item)
            if kind not in _PLAIN_TYPES and not (kind is int and -_INT_LIMIT < item < _INT_LIMIT):
                return False
    return True


def fingerprint_of(request: bytes) -> bytes:
    """The fingerprint of a :func:`canonical_request`."""
    return hashlib.blake2b(request, digest_size=FINGERPRINT_BYTES, person=_PERSON).digest()


def fingerprint(method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bytes:
    """The stable 16-byte fingerprint of a call's payload.

    ``blake2b(canonical_cbor([method, list(args), dict(kwargs)]), digest_size=16)``
    with a txrpc-specific personalisation. Raises ``TypeError`` if the arguments are
    not CBOR-encodable.
    """
    return fingerprint_of(canonical_request(method, args, kwargs))


def check_key(key: object) -> str:
    """Return ``key`` if it is a usable idempotency key: a non-empty ``str`` of at most
    :data:`KEY_CHARS_MAX` printable characters. Raises :class:`InvalidArgument` otherwise."""
    if not isinstance(key, str):
        raise InvalidArgument(f"idempotency_key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidArgument("idempotency_key must not be empty")
    if len(key) > KEY_CHARS_MAX:
        raise InvalidArgument(f"idempotency_key is {len(key)} characters; at most {KEY_CHARS_MAX}")
    if not key.isprintable():
        raise InvalidArgument("idempotency_key must contain printable characters only")
    return key


class LoggedRequest(Protocol):
    """What :func:`decide` reads of a request-log row (``storage.RequestRecord`` fits)."""

    @property
    def method(self) -> str: ...
    @property
    def fingerprint(self) -> bytes: ...
    @property
    def state(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def lease_expires_at(self) -> float: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """No row: execute the request (the driver's insert made it attempt 1)."""


R = TypeVar("R", bound=LoggedRequest)


@dataclasses.dataclass(frozen=True, slots=True)
class Replay(Generic[R]):
    """The same request completed: send back its stored outcome, response or error.

    ``record`` is the row given to :func:`decide` (its own type is kept).
    """

    record: R


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used for a different payload; nothing runs."""

    stored_method: str
    method: str

    def to_error(self) -> IdempotencyKeyMismatch:
        return IdempotencyKeyMismatch(
            "this idempotency key was already used with a different request payload",
            {"stored_method": self.stored_method, "method": self.method},
        )


@dataclasses.dataclass(frozen=True, slots=True)
class InProgress:
    """The same request is running under a live lease; ``retry_after_s`` until it ends."""

    attempt: int
    retry_after_s: float

    def to_error(self) -> RequestInProgress:
        return RequestInProgress(
            "a request with this idempotency key is still running",
            {"retry_after_s": self.retry_after_s, "attempt": self.attempt},
        )


@dataclasses.dataclass(frozen=True, slots=True)
class TakeOver:
    """The same request was in progress but its lease ended: its executor is presumed
    dead. Take over attempt ``attempt_seen`` (guarded in storage) and execute."""

    attempt_seen: int


Decision = Run | Replay[Any] | Mismatch | InProgress | TakeOver


def decide(
    existing: R | None, request_fingerprint: bytes, now: float, method: str = ""
) -> Run | Replay[R] | Mismatch | InProgress | TakeOver:
    """The decision for a call with ``request_fingerprint`` given the ``existing`` row.

    Pure and total over valid rows. ``method`` only labels a :class:`Mismatch`.
    Raises ``ValueError`` for a row in an unknown state or a non-finite ``now``
    (corruption or a caller bug: never guess).
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now!r}")
    if existing is None:
        return Run()
    if existing.state not in (STATE_IN_PROGRESS, STATE_COMPLETED):
        raise ValueError(f"request-log row in unknown state {existing.state!r}")
    if existing.fingerprint != request_fingerprint:
        return Mismatch(stored_method=existing.method, method=method)
    if existing.state == STATE_COMPLETED:
        return Replay(existing)
    if existing.lease_expires_at > now:
        return InProgress(attempt=existing.attempt, retry_after_s=existing.lease_expires_at - now)
    return TakeOver(attempt_seen=existing.attempt)
