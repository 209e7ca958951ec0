"""The server's driver for calls that carry an idempotency key.

A call whose metadata has ``idempotency_key`` is served through the request log
(``storage.RequestLog``); everything else never reaches this module. For one
(identity, key) the driver guarantees (see ``specs/guarantees.md``):

- a new key is recorded ``in_progress`` (attempt 1, with a lease) before the handler
  runs, and the outcome — response or error — is durable in the log before the reply
  is queued;
- a completed key with the same fingerprint is answered from the log (result metadata
  ``{"replayed": true}``, or ``details["replayed"] = true`` on an error) without
  running the handler;
- the same key with another payload is ``IdempotencyKeyMismatch``;
- a key still running is ``RequestInProgress`` — or, if the call asked for it with
  metadata ``idempotency_wait: true``, the caller waits (bounded by its deadline) and
  gets the outcome;
- a key whose executor died is taken over once its lease has expired and run again;
- a handler's writes through ``txrpc.current_call().store`` commit in the same
  transaction as the outcome (``complete(extra_writes=...)``): exactly once.

The decisions themselves are the sans-IO :func:`txrpc._idempotency.decide`; the
storage guards make them atomic across processes. Time for the log comes only from
the injected ``wall_clock`` (leases and retention compare stored times across
restarts); waiting uses trio's clock.

``TXRPC_CRASH_AT=server.after_log_commit`` (read once, at import) makes the process
SIGKILL itself after an outcome is durable and before its reply is queued: a test-only
crash point for the lost-reply scenario.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio

from . import _env
from . import _idempotency as idem
from ._codec import FrameError, check_keys, decode_value, encode_value
from ._errors import (
    Aborted,
    Code,
    DataLoss,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    RpcError,
    Unavailable,
)
from ._service import CallContext, MethodSpec, _current_call

if TYPE_CHECKING:
    from storage import (
        BeginResult,
        KvTransaction,
        Outcome,
        RanResult,
        RequestLog,
        RequestRecord,
        Storage,
        StoredError,
    )

log = logging.getLogger("txrpc.server.idempotency")

#: Call metadata: the idempotency key (text) and the "wait while in progress" flag.
KEY_METADATA: Final = "idempotency_key"
WAIT_METADATA: Final = "idempotency_wait"
#: Result metadata / error details flag of an answer served from the log.
REPLAYED: Final = "replayed"

LEASE_S_DEFAULT: Final = 30.0
RETENTION_S_DEFAULT: Final = 24 * 3600.0
PRUNE_INTERVAL_S_MIN: Final = 1.0
PRUNE_INTERVAL_S_MAX: Final = 3600.0
PRUNE_BATCH_ROWS: Final = 1000
CONFLICT_RERUNS_MAX: Final = 8
RELEASE_TIMEOUT_S: Final = 5.0
WAIT_POLL_S_MIN: Final = 0.005
WAIT_POLL_S_MAX: Final = 0.25

# Errors that say "try again" rather than "this is the answer": the attempt is
# released instead of recorded, so a retry runs the handler afresh.
TRANSIENT_CODES: Final = frozenset(
    {
        Code.CANCELLED,
        Code.DEADLINE_EXCEEDED,
        Code.UNAVAILABLE,
        Code.RESOURCE_EXHAUSTED,
        Code.REQUEST_IN_PROGRESS,
    }
)

CRASH_AFTER_LOG_COMMIT: Final = "server.after_log_commit"
_BROKEN_KEY_SEPARATOR: Final = "#broken-lookup#"
_CRASH_AT: Final = os.environ.get("TXRPC_CRASH_AT") or None


def crash_point(name: str) -> None:
    """Test-only: SIGKILL this process if ``TXRPC_CRASH_AT`` named this point at import."""
    if _CRASH_AT is not None and _CRASH_AT == name:
        os.kill(os.getpid(), signal.SIGKILL)


def retention_prune_interval(retention_s: float) -> float:
    """The default pruner interval: 1/24 of the retention window, within [1 s, 1 h]."""
    return min(max(retention_s / 24.0, PRUNE_INTERVAL_S_MIN), PRUNE_INTERVAL_S_MAX)


@dataclasses.dataclass(slots=True)
class Answer:
    """What to send for a keyed call: a value (with result metadata) or an error."""

    value: Any = None
    metadata: dict[str, Any] | None = None
    error: RpcError | None = None
    encoded: bytes | None = None  # ``encode_value(value)``, when already made (keys checked)


#: What :meth:`IdempotencyDriver.start` finishes with when the call was not run: its
#: deadline passed, or its caller cancelled it or left, before its handler could run
#: (nothing ran, nothing is recorded, the key is free).
EXPIRED: Final = Answer(error=DeadlineExceeded("the deadline expired before the call ran", {"not_started": True}))


@dataclasses.dataclass(slots=True, eq=False)
class _Running:
    """An execution of one (identity, key) in this process."""

    identity: str
    key: str
    attempt: int
    method: str
    fingerprint: bytes
    lease_expires_at: float  # wall clock
    renewed_at: float  # trio clock
    waiters: trio.Event | None = None  # set when it ends; made by the first that waits
    lost: bool = False  # the lease could not be renewed: another executor took over
    one_write: bool = False  # run inside its log batch (no row in progress: no lease to renew)
    ran: bool = False  # (one_write) the handler has run


class _LeaseLostDuringRun(Exception):
    """Internal: the lease could not be renewed (another executor took over)."""


def _encode_details(details: dict[str, Any]) -> bytes:
    if not details:
        return b""
    try:
        check_keys(details)
        return encode_value(details)
    except Exception as exc:  # (TypeError; RecursionError for details nested too deep)
        return encode_value({"unencodable_details": f"{type(exc).__name__}: {exc}"})


def stored_error(error: RpcError) -> StoredError:
    from storage import StoredError

    return StoredError(int(error.code), error.message, _encode_details(error.details))


def replayed_answer(record: RequestRecord) -> Answer:
    """The stored outcome of a completed row, flagged as replayed."""
    if record.error is not None:
        details: dict[str, Any] = {}
        if record.error.details:
            try:
                decoded = decode_value(record.error.details)
            except FrameError as exc:
                decoded = {"undecodable_details": str(exc)}
            details = dict(decoded) if isinstance(decoded, dict) else {"details": decoded}
        details[REPLAYED] = True
        return Answer(error=RpcError.from_wire(record.error.code, record.error.message, details))
    if record.response is None:
        return Answer(error=DataLoss("the request log has a completed row without an outcome"))
    try:
        value = decode_value(record.response)
    except FrameError as exc:
        return Answer(error=DataLoss(f"the stored response cannot be decoded: {exc}"))
    return Answer(value=value, metadata={REPLAYED: True})


class IdempotencyDriver:
    """Serves keyed calls through a request log; one per :class:`txrpc.Server`.

    ``wall_clock`` gives the seconds stored in the log (leases, retention): it must
    survive restarts (``time.time`` in production, a fake clock in tests).
    ``identity_of(ctx)`` names the caller whose key space the call uses.
    """

    def __init__(
        self,
        request_log: RequestLog | Storage,
        *,
        wall_clock: Callable[[], float],
        lease_s: float = LEASE_S_DEFAULT,
        retention_s: float = RETENTION_S_DEFAULT,
        prune_interval_s: float | None = None,
        store_namespace: str = "",
        identity_of: Callable[[CallContext], str] | None = None,
        conflict_reruns_max: int = CONFLICT_RERUNS_MAX,
    ) -> None:
        import storage  # not at module level: `import txrpc` stays free of SQLAlchemy

        self._storage = storage
        self._kv_transaction: type[KvTransaction] = storage.KvTransaction
        if isinstance(request_log, storage.Storage):
            request_log = request_log.request_log
        if not isinstance(request_log, storage.RequestLog):
            raise TypeError(
                f"request_log must be a storage.RequestLog or Storage, not {type(request_log).__name__}"
            )
        if not lease_s > 0 or not retention_s > 0:
            raise ValueError("lease_s and retention_s must be > 0")
        if retention_s < lease_s:
            raise ValueError("retention_s must be at least lease_s")
        self.request_log = request_log
        self.wall_clock = wall_clock
        self.lease_s = float(lease_s)
        self.retention_s = float(retention_s)
        interval = retention_prune_interval(retention_s) if prune_interval_s is None else prune_interval_s
        self.prune_interval_s = min(max(float(interval), PRUNE_INTERVAL_S_MIN), PRUNE_INTERVAL_S_MAX)
        self.store_namespace = store_namespace
        self.identity_of = identity_of or _anonymous_scope
        self.conflict_reruns_max = conflict_reruns_max
        self._running: dict[tuple[str, str], _Running] = {}
        self._broken_lookups = 0
        self.keeper_running = False
        self._rerun_lock = trio.Lock()
        # Counters (tests, benchmarks, `txrpc serve` logs).
        self.executions = 0
        self.replays = 0
        self.conflict_reruns = 0
        self.pruned = 0

    # -- the call path -------------------------------------------------------------

    async def answer(
        self,
        spec: MethodSpec,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: CallContext,
        begun: BeginResult | None = None,
    ) -> Answer:
        """Serve one keyed call; runs inside the call's cancel scope (its deadline).

        ``begun``: what :meth:`start` found instead of running the call (the key's row,
        or our own in-progress row): go on from there."""
        try:
            key = idem.check_key(ctx.metadata.get(KEY_METADATA))
            request = idem.canonical_request(method, args, kwargs)
        except InvalidArgument as exc:
            return Answer(error=exc)
        except TypeError as exc:
            return Answer(error=InvalidArgument(str(exc)))
        fingerprint = idem.fingerprint_of(request)
        wait = ctx.metadata.get(WAIT_METADATA) is True
        identity = self.identity_of(ctx)
        pk = (identity, key)
        if _env.broken("server.skip_request_log_lookup"):
            # Test-only broken protocol (simulator): the lookup never finds an earlier
            # record of this key, so every retry executes again.
            self._broken_lookups += 1
            key = f"{key}{_BROKEN_KEY_SEPARATOR}{self._broken_lookups}"
            pk = (identity, key)
        log_ = self.request_log
        poll_s = WAIT_POLL_S_MIN
        record: RequestRecord | None = None
        if begun is not None:
            if begun.new:
                if trio.current_time() >= ctx.deadline:  # (the handler would run unchecked)
                    self.release_soon(*pk, 1)
                    return EXPIRED
                return await self._execute(spec, method, args, kwargs, ctx, pk, 1, fingerprint)
            record = begun.record
        begun_ = begun is not None
        while True:
            running = self._running.get(pk)
            if running is not None:
                # Executing in this process: decide without touching the database.
                if running.fingerprint != fingerprint:
                    return Answer(error=idem.Mismatch(running.method, method).to_error())
                if not wait:
                    retry_after = max(running.lease_expires_at - self.wall_clock(), 0.0)
                    return Answer(error=idem.InProgress(running.attempt, retry_after).to_error())
                if running.waiters is None:
                    running.waiters = trio.Event()
                await running.waiters.wait()
                record = None
                begun_ = False
                continue
            now = self.wall_clock()
            if record is None and not begun_ and spec.runs_inline and log_.runs_inline:
                one = await self._one_write(spec, method, args, kwargs, ctx, pk, fingerprint, request, now)
                if isinstance(one, Answer):
                    return one
                begun_ = True
                if one.new:  # (its batch went to a worker thread) the row is ours, in progress
                    return await self._execute(spec, method, args, kwargs, ctx, pk, 1, fingerprint)
                record = one.record
            try:
                if record is None and not begun_:
                    result = await log_.begin(
                        identity, key, method, fingerprint, self.lease_s, now, request=request
                    )
                    begun_ = True
                    if result.new:
                        return await self._execute(spec, method, args, kwargs, ctx, pk, 1, fingerprint)
                    record = result.record
                else:
                    record = await log_.get(identity, key)
                    if record is None:  # released or pruned meanwhile: start afresh
                        begun_ = False
                        continue
            except Exception as exc:
                return Answer(error=_storage_error(exc, before_run=True))
            decision = idem.decide(record, fingerprint, now, method)
            if isinstance(decision, idem.Replay):
                self.replays += 1
                answer = replayed_answer(decision.record)
                try:
                    # What we read may be committed but not yet flushed (pipelined fsync):
                    # never reply with an outcome a power loss could still take back.
                    await log_.sync()
                except Exception as exc:
                    return Answer(error=_storage_error(exc, before_run=True))
                try:
                    await log_.note_replay(identity, key, now)
                except Exception as exc:  # accounting only: the answer stands
                    log.warning("could not count a replay of %r: %s", key, exc)
                return answer
            if isinstance(decision, idem.Mismatch):
                return Answer(error=decision.to_error())
            if isinstance(decision, idem.InProgress):
                if not wait:
                    return Answer(error=decision.to_error())
                await trio.sleep(min(poll_s, decision.retry_after_s + WAIT_POLL_S_MIN))
                poll_s = min(poll_s * 2, WAIT_POLL_S_MAX)
                continue
            if isinstance(decision, idem.TakeOver):
                try:
                    taken = await log_.take_over(identity, key, decision.attempt_seen, self.lease_s, now)
                except Exception as exc:
                    return Answer(error=_storage_error(exc, before_run=True))
                if taken is not None:
                    return await self._execute(
                        spec, method, args, kwargs, ctx, pk, taken.attempt, fingerprint
                    )
                record = None  # someone else won: look again
                begun_ = True
                continue
            raise AssertionError(f"decide returned {decision!r}")  # Run only without a row

    async def _one_write(
        self,
        spec: MethodSpec,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: CallContext,
        pk: tuple[str, str],
        fingerprint: bytes,
        request: bytes,
        now: float,
    ) -> Answer | BeginResult:
        """A handler that runs inline, on SQLite: look the key up, run the handler and
        record its outcome in one write (``RequestLog.begin_and_run``). Returns the
        answer, or what ``begin`` would have (the row found; or our in-progress row)."""
        snapshot = contextvars.copy_context()
        running, run = self._one_write_run(spec, method, args, kwargs, ctx, pk, fingerprint, now, None, snapshot)
        self._running[pk] = running  # duplicates in this process wait or are refused meanwhile
        try:
            result = await self.request_log.begin_and_run(
                pk[0], pk[1], method, fingerprint, self.lease_s, now, run, request=request
            )
        except Exception as exc:
            return self._one_write_done(pk, running, None, exc)
        except BaseException:
            self._forget(pk, running)
            raise
        return self._one_write_done(pk, running, result, None)

    def start(
        self,
        spec: MethodSpec,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: CallContext,
        wanted: Callable[[], bool],
        finish: Callable[[Answer | BeginResult], None],
    ) -> bool:
        """Start a keyed call without a task of its own, if it can go in one write: a
        handler that runs inline, a request log that runs it inside its batch, a key
        not running in this process. ``finish`` is called from the log's flusher, in
        a copy of the caller's context, with the answer — :data:`EXPIRED` if the
        deadline passed or ``wanted()`` turned False (the caller cancelled or left)
        before the handler ran — or with what ``begin`` found, for the caller to go on
        in a task (:meth:`answer`'s ``begun``). Returns False, having started nothing,
        for every other call."""
        if not (spec.runs_inline and self.request_log.runs_inline) or _env.broken(
            "server.skip_request_log_lookup"
        ):
            return False
        try:
            key = idem.check_key(ctx.metadata.get(KEY_METADATA))
            request = idem.canonical_request(method, args, kwargs)
        except (InvalidArgument, TypeError):
            return False  # the general path answers it
        pk = (self.identity_of(ctx), key)
        if pk in self._running:
            return False
        fingerprint = idem.fingerprint_of(request)
        now = self.wall_clock()
        snapshot = contextvars.copy_context()
        running, run = self._one_write_run(spec, method, args, kwargs, ctx, pk, fingerprint, now, wanted, snapshot)

        def done(result: BeginResult | RanResult | None, exc: BaseException | None) -> None:
            error = exc if exc is None or isinstance(exc, Exception) else Internal(f"request log: {exc!r}")
            answer = self._one_write_done(pk, running, result, error)
            if not isinstance(answer, Answer) and (trio.current_time() >= ctx.deadline or not wanted()):
                if answer.new:  # our row, in progress, for a call no one waits for: free the key
                    self.release_soon(*pk, 1)
                answer = EXPIRED
            snapshot.run(finish, answer)

        self._running[pk] = running
        try:
            self.request_log.begin_and_run_nowait(
                pk[0], key, method, fingerprint, self.lease_s, now, run, done, request=request
            )
        except Exception:
            self._forget(pk, running)
            return False  # (queue full, closing): the general path answers it
        return True

    def _one_write_run(
        self,
        spec: MethodSpec,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: CallContext,
        pk: tuple[str, str],
        fingerprint: bytes,
        now: float,
        wanted: Callable[[], bool] | None,
        snapshot: contextvars.Context,
    ) -> tuple[_Running, Callable[[], Outcome]]:
        """The call's entry in ``_running`` and the ``run`` its batch calls: the handler
        in ``snapshot`` (a copy of the caller's context: what it sets stays with the
        call), or nothing if the deadline passed or ``wanted()`` is False."""
        running = _Running(
            pk[0], pk[1], 1, method, fingerprint, now + self.lease_s, trio.current_time(), one_write=True
        )

        def run() -> Outcome:
            if trio.current_time() >= ctx.deadline or (wanted is not None and not wanted()):
                expired: Outcome = self._storage.Outcome(record=False, value=EXPIRED)
                return expired
            running.ran = True
            outcome: Outcome = snapshot.run(self._run_in_batch, spec, args, kwargs, ctx, pk[1])
            return outcome

        return running, run

    def _one_write_done(
        self,
        pk: tuple[str, str],
        running: _Running,
        result: BeginResult | RanResult | None,
        exc: Exception | None,
    ) -> Answer | BeginResult:
        self._forget(pk, running)
        if exc is not None:
            return Answer(error=_storage_error(exc, before_run=not running.ran))
        assert result is not None
        if isinstance(result, self._storage.RanResult):
            answer: Answer = result.outcome.value
            if result.recorded:
                crash_point(CRASH_AFTER_LOG_COMMIT)
            return answer
        return result

    def release_soon(self, identity: str, key: str, attempt: int) -> None:
        """Queue the release of our in-progress ``attempt`` (no task needed)."""
        try:
            self.request_log.release_nowait(identity, key, attempt)
        except Exception as exc:  # the lease will expire instead
            log.warning("could not release %r attempt %d: %s", key, attempt, exc)

    def _forget(self, pk: tuple[str, str], running: _Running) -> None:
        if self._running.get(pk) is running:
            del self._running[pk]
        if running.waiters is not None:
            running.waiters.set()

    def _run_in_batch(
        self, spec: MethodSpec, args: list[Any], kwargs: dict[str, Any], ctx: CallContext, key: str
    ) -> Outcome:
        """Inside the log batch's transaction, on the event loop's thread, in a copy of
        the writer's context: run the handler to completion (it cannot suspend)."""
        _current_call.set(ctx)
        ctx.idempotency_key = key.split(_BROKEN_KEY_SEPARATOR)[0]
        ctx.attempt = 1
        database = self.request_log.database
        namespace = self.store_namespace
        ctx._store_factory = lambda: self._kv_transaction(database, namespace)
        ctx._store = None
        self.executions += 1
        outcome = self._storage.Outcome
        value: Any = None
        error: RpcError | None = None
        try:
            value = spec.call_inline(args, kwargs)
        except RpcError as exc:
            error = exc
        except TypeError as exc:
            problem = spec.arguments_fit(args, kwargs)
            if problem is not None:
                return outcome(record=False, value=Answer(error=InvalidArgument(f"{spec.name}: {problem}")))
            error = _internal(spec, ctx, exc)
        except Exception as exc:
            error = _internal(spec, ctx, exc)
        finally:
            ctx._store_factory = None
        if error is not None and error.code in TRANSIENT_CODES:
            return outcome(record=False, value=Answer(error=error))
        response: bytes | None = None
        if error is None:
            try:
                check_keys(value)
                response = encode_value(value)
            except Exception as exc:  # (TypeError; RecursionError for a value nested too deep)
                error = Internal(f"handler returned a value CBOR cannot carry: {type(exc).__name__}: {exc}")
        if error is not None:
            return outcome(error=stored_error(error), value=Answer(error=error))
        store = ctx._store
        extra = store.apply if store is not None and store.written_keys else None
        return outcome(response=response, extra_writes=extra, value=Answer(value=value, encoded=response))

    async def _execute(
        self,
        spec: MethodSpec,
        method: str,
        args: list[Any],
        kwargs: dict[str, Any],
        ctx: CallContext,
        pk: tuple[str, str],
        attempt: int,
        fingerprint: bytes,
    ) -> Answer:
        """Run the handler as ``attempt`` (this process owns the row) and record its outcome."""
        identity, key = pk
        log_ = self.request_log
        running = _Running(
            identity, key, attempt, method, fingerprint, self.wall_clock() + self.lease_s, trio.current_time()
        )
        self._running[pk] = running
        settled = False  # recorded, or known to be someone else's
        database = log_.database
        namespace = self.store_namespace
        ctx.idempotency_key = key.split(_BROKEN_KEY_SEPARATOR)[0]
        ctx.attempt = attempt

        def new_store() -> KvTransaction:
            return self._kv_transaction(database, namespace)

        ctx._store_factory = new_store
        try:
            for run in range(self.conflict_reruns_max + 1):
                if run == 0:
                    answer, settled = await self._run_and_record(spec, args, kwargs, ctx, running)
                else:
                    # Re-runs after a write conflict go one at a time, so each meets at
                    # most the first runs of newer calls: a hot key makes progress.
                    async with self._rerun_lock:
                        answer, settled = await self._run_and_record(spec, args, kwargs, ctx, running)
                if answer is not None:
                    return answer
                self.conflict_reruns += 1  # what the handler read changed: run it on fresh reads
            return Answer(
                error=Aborted(
                    f"{method}: what the handler read kept changing before its outcome could be "
                    f"recorded ({self.conflict_reruns_max + 1} runs); nothing was applied, try again"
                )
            )
        finally:
            del self._running[pk]
            if running.waiters is not None:
                running.waiters.set()
            ctx._store_factory = None
            if not settled:
                with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT_S):
                    try:
                        await log_.release(identity, key, attempt)
                    except Exception as exc:  # the lease will expire instead
                        log.warning("could not release %r attempt %d: %s", key, attempt, exc)

    async def _run_and_record(
        self, spec: MethodSpec, args: list[Any], kwargs: dict[str, Any], ctx: CallContext, running: _Running
    ) -> tuple[Answer | None, bool]:
        """Run the handler once and record its outcome.

        Returns ``(answer, settled)``: ``answer`` None means a write conflict (run again);
        ``settled`` means the row is no longer this attempt's to release (recorded, or
        taken over).
        """
        st = self._storage
        identity, key, attempt = running.identity, running.key, running.attempt
        ctx._store = None
        self.executions += 1
        try:
            value, error = await self._run_handler(spec, args, kwargs, ctx, running)
        except _LeaseLostDuringRun:
            return await self._after_lease_lost((identity, key), running.fingerprint, running.method), True
        if error is not None and (error.code in TRANSIENT_CODES or error.details.get("_not_run")):
            error.details.pop("_not_run", None)
            return Answer(error=error), False  # released by the caller: a retry runs afresh
        response: bytes | None = None
        if error is None:
            try:
                check_keys(value)
                response = encode_value(value)
            except Exception as exc:  # (TypeError; RecursionError for a value nested too deep)
                error = Internal(f"handler returned a value CBOR cannot carry: {type(exc).__name__}: {exc}")
        # The store's writes commit with a result; an error outcome discards them (like
        # an aborted transaction) but is still checked against fresh reads.
        store = ctx._store
        extra: Callable[[Any], object] | None = None
        if store is not None and error is None and (store.read_keys or store.written_keys):
            extra = store.apply
        elif store is not None and error is not None and store.read_keys:
            extra = store.check
        try:
            await self.request_log.complete(
                identity,
                key,
                attempt,
                now=self.wall_clock(),
                response=response,
                error=None if error is None else stored_error(error),
                extra_writes=extra,
            )
        except st.WriteConflict:
            return None, False
        except st.LeaseLost:
            return await self._after_lease_lost((identity, key), running.fingerprint, running.method), True
        except st.BatchFailed as exc:
            # Not recorded (or unknown: then the release is a no-op on a completed row).
            return Answer(error=_storage_error(exc, before_run=False)), False
        # Durable: the outcome (and the store writes) are in the log. Only now reply.
        crash_point(CRASH_AFTER_LOG_COMMIT)
        if error is not None:
            return Answer(error=error), True
        return Answer(value=value), True

    async def _run_handler(
        self, spec: MethodSpec, args: list[Any], kwargs: dict[str, Any], ctx: CallContext, running: _Running
    ) -> tuple[Any, RpcError | None]:
        """Run the handler once (the lease keeper renews its lease meanwhile).

        Returns ``(value, None)`` or ``(None, error)``; an error with
        ``details["_not_run"]`` means the arguments did not fit (nothing ran).
        Raises :class:`_LeaseLostDuringRun` if the lease could not be kept.
        """
        # The handler is not cancelled when its lease is lost (a cancel scope per call
        # costs more than it saves): it finishes, and its outcome is refused instead.
        value: Any = None
        error: RpcError | None = None
        try:
            if spec.is_async:
                value = await spec.fn(*args, **kwargs)
            else:
                value = spec.fn(*args, **kwargs)
        except RpcError as exc:
            error = exc
        except TypeError as exc:
            problem = spec.arguments_fit(args, kwargs)
            if problem is not None:
                error = InvalidArgument(f"{spec.name}: {problem}", {"_not_run": True})
            else:
                error = _internal(spec, ctx, exc)
        except Exception as exc:
            error = _internal(spec, ctx, exc)
        if running.lost:
            raise _LeaseLostDuringRun()
        return value, error

    async def run_lease_keeper(self) -> None:
        """Renew the lease of every execution in this process every ``lease_s / 3``.

        One task for the whole server (a renewal is one group-committed record; all
        due renewals go out together). An execution whose lease cannot be renewed has
        been taken over by another executor: its outcome will be refused.
        """
        if self.keeper_running:
            return
        self.keeper_running = True
        interval = self.lease_s / 3.0
        try:
            while True:
                await trio.sleep(interval / 2.0)
                now_t = trio.current_time()
                due = [
                    r
                    for r in self._running.values()
                    if now_t - r.renewed_at >= interval and not r.lost and not r.one_write
                ]
                if due:
                    async with trio.open_nursery() as nursery:
                        for running in due:
                            nursery.start_soon(self._renew, running)
        finally:
            self.keeper_running = False

    async def _renew(self, running: _Running) -> None:
        now = self.wall_clock()
        started = trio.current_time()
        try:
            renewed = await self.request_log.renew_lease(
                running.identity, running.key, running.attempt, self.lease_s, now
            )
        except Exception as exc:
            log.warning("could not renew the lease of %r: %s", running.key, exc)
            return
        if renewed:
            running.renewed_at = started
            running.lease_expires_at = now + self.lease_s
        elif self._running.get((running.identity, running.key)) is running:
            running.lost = True  # its outcome will not be recorded

    async def _after_lease_lost(self, pk: tuple[str, str], fingerprint: bytes, method: str) -> Answer:
        """Another executor owns the key now: answer with what the log says."""
        try:
            record = await self.request_log.get(*pk)
        except Exception as exc:
            return Answer(error=_storage_error(exc, before_run=False))
        if record is None:
            return Answer(error=Unavailable("the request was released by its executor; retry", {}))
        decision = idem.decide(record, fingerprint, self.wall_clock(), method)
        if isinstance(decision, idem.Replay):
            try:
                await self.request_log.sync()
            except Exception as exc:
                return Answer(error=_storage_error(exc, before_run=False))
            return replayed_answer(decision.record)
        if isinstance(decision, idem.Mismatch):
            return Answer(error=decision.to_error())
        retry_after = max(record.lease_expires_at - self.wall_clock(), 0.0)
        return Answer(error=idem.InProgress(record.attempt, retry_after).to_error())

    # -- retention -----------------------------------------------------------------

    async def prune_now(self) -> int:
        """Delete what is past the retention window (in chunks); returns how many rows."""
        cutoff = self.wall_clock() - self.retention_s
        total = 0
        while True:
            deleted = await self.request_log.prune(cutoff, limit=PRUNE_BATCH_ROWS)
            total += deleted
            if deleted < PRUNE_BATCH_ROWS:
                break
            await trio.sleep(0)  # let other writers in between chunks
        self.pruned += total
        return total

    async def run_pruner(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prune every ``prune_interval_s`` until cancelled; failures are logged, never fatal."""
        task_status.started()
        while True:
            await trio.sleep(self.prune_interval_s)
            try:
                deleted = await self.prune_now()
            except Exception as exc:
                log.warning("pruning the request log failed (will retry): %s", exc)
                continue
            if deleted:
                log.info("pruned %d request-log rows older than %.0f s", deleted, self.retention_s)


def _anonymous_scope(ctx: CallContext) -> str:
    return ctx.identity


def _internal(spec: MethodSpec, ctx: CallContext, exc: BaseException) -> Internal:
    log.error("handler %s raised (call %d from %s)", spec.name, ctx.call_id, ctx.peer, exc_info=exc)
    return Internal(f"{type(exc).__name__}: {exc}")


def _storage_error(exc: Exception, *, before_run: bool) -> RpcError:
    """Map a request-log failure to what the caller sees."""
    from storage import AppendQueueFull, BatchFailed, StorageError

    if isinstance(exc, AppendQueueFull):
        return ResourceExhausted(f"request log is busy: {exc}", {"not_started": before_run})
    if isinstance(exc, BatchFailed):
        surely_not_run = before_run and not exc.outcome_unknown
        return Unavailable(f"request log write failed: {exc}", {"not_started": surely_not_run})
    if isinstance(exc, StorageError):
        return Unavailable(f"request log unavailable: {exc}", {"not_started": before_run})
    if isinstance(exc, RpcError):
        return exc
    log.error("request log failed unexpectedly", exc_info=exc)
    return Internal(f"request log failed: {type(exc).__name__}: {exc}")
