"""The error-code table and the exception hierarchy.

Every error a caller can see is an :class:`RpcError` with a numeric ``code`` from
:class:`Code` (the same table as ``specs/wire.md``), a human ``message`` and a
``details`` map. Handlers raise these to send their own code; anything else a
handler raises reaches the caller as :class:`Internal`.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class Code(enum.IntEnum):
    """Error codes carried on the wire (gRPC's table, then txrpc's own from 100)."""

    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16
    PROTOCOL_ERROR = 100
    WRONG_EPOCH = 101
    IDEMPOTENCY_KEY_MISMATCH = 102
    REQUEST_IN_PROGRESS = 103


class RpcError(Exception):
    """Base of every error a txrpc call can raise.

    ``code`` is a :class:`Code`, ``message`` a sentence for humans, ``details`` a map
    of CBOR-able values for programs (for example the current shard map of a
    ``WRONG_EPOCH``).
    """

    code: ClassVar[Code] = Code.UNKNOWN
    _by_code: ClassVar[dict[int, type[RpcError]]] = {}

    def __init__(self, message: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details) if details else {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The first class declared for a code is the one a received error becomes.
        RpcError._by_code.setdefault(int(cls.code), cls)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"

    @staticmethod
    def from_wire(code: int, message: str, details: dict[str, Any] | None = None) -> RpcError:
        """The exception for an error received on the wire (unknown codes become ``UnknownError``)."""
        cls = RpcError._by_code.get(code)
        if cls is None:
            err: RpcError = UnknownError(f"[code {code}] {message}", details)
            return err
        return cls(message, details)

    @property
    def nothing_ran(self) -> bool:
        """True when the error guarantees the handler did not run (safe to retry anywhere)."""
        return bool(self.details.get("not_started"))


class UnknownError(RpcError):
    code = Code.UNKNOWN


class Cancelled(RpcError):
    code = Code.CANCELLED


class InvalidArgument(RpcError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(RpcError):
    code = Code.DEADLINE_EXCEEDED


class NotFound(RpcError):
    code = Code.NOT_FOUND


class AlreadyExists(RpcError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(RpcError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(RpcError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    code = Code.FAILED_PRECONDITION


class Aborted(RpcError):
    code = Code.ABORTED


class OutOfRange(RpcError):
    code = Code.OUT_OF_RANGE


class Unimplemented(RpcError):
    """The method does not exist on the server (or the feature is not supported)."""

    code = Code.UNIMPLEMENTED


MethodNotFound = Unimplemented


class Internal(RpcError):
    """The handler raised something that is not an RpcError; the message says what."""

    code = Code.INTERNAL


class Unavailable(RpcError):
    """The connection failed or the server is going away.

    ``details["not_started"]`` is true when the server guarantees the call did not run.
    """

    code = Code.UNAVAILABLE


class DataLoss(RpcError):
    code = Code.DATA_LOSS


class Unauthenticated(RpcError):
    code = Code.UNAUTHENTICATED


class ProtocolError(RpcError):
    """A peer broke the wire protocol (malformed frame, bad message, oversized frame)."""

    code = Code.PROTOCOL_ERROR


class WrongEpoch(RpcError):
    """The server's shard map epoch differs; ``details["shard_map"]`` carries its map."""

    code = Code.WRONG_EPOCH


class IdempotencyKeyMismatch(RpcError):
    """The idempotency key was already used with a different request payload."""

    code = Code.IDEMPOTENCY_KEY_MISMATCH


class RequestInProgress(RpcError):
    """A request with this idempotency key is still running."""

    code = Code.REQUEST_IN_PROGRESS


class Abort(Aborted):
    """Raise inside a ``@service.transactional`` method to abort the transaction
    (the shard votes no); the caller gets :class:`TransactionAborted` with the reason."""


class TransactionAborted(Aborted):
    """The transaction did not commit; nothing it wrote is visible anywhere.

    ``reason`` says why (conflict, a vote no, the user's ``Abort``, timeout);
    ``retryable`` is true when running the transaction again may succeed (conflicts,
    timeouts), false for a user ``Abort``; ``txid`` identifies it.
    """

    @property
    def reason(self) -> str:
        return self.message

    @property
    def retryable(self) -> bool:
        return bool(self.details.get("retryable"))

    @property
    def txid(self) -> int | None:
        value = self.details.get("txid")
        return int(value) if value is not None else None


class OutcomeUnknown(RpcError):
    """The client could not learn whether the transaction committed (e.g. the
    coordinator was unreachable during commit). It is NOT a failure: the outcome is
    decided and durable; ask later with ``cluster.outcome(txid)`` / ``txrpc tx show``."""

    code = Code.UNKNOWN

    @property
    def txid(self) -> int | None:
        value = self.details.get("txid")
        return int(value) if value is not None else None
