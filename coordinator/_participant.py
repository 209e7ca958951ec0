"""The participant runtime: a shard primary hosting ``@service.transactional`` methods.

Runs the user's handlers with a :class:`TxHandle` bound to the caller's transaction,
takes locks (strict 2PL, wait-die), buffers writes, and answers the coordinator's
``tx.prepare`` / ``tx.commit`` / ``tx.abort`` / ``tx.commit_one_phase``. Decisions come
from :class:`ParticipantCore`; durability from :class:`storage.ShardStore`.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

import txrpc
from storage import ShardStore
from txrpc import _env
from txrpc._routing import EpochGuard
from txrpc._service import MethodSpec

from ._faults import crash_point
from ._locks import DIE, GRANTED, SCAN_RESOURCE, Mode, Request
from ._participant_core import (
    TOMBSTONE,
    CommitAction,
    ParticipantCore,
    ParticipantTx,
    PrepareAction,
    TxState,
    Vote,
)

log = logging.getLogger("txrpc.participant")

AUTOCOMMIT_TXID_BASE = 2**62  # local single-shard transactions: always younger than any coordinator txid
AUTOCOMMIT_ATTEMPTS_MAX = 5


class _Conflict(Exception):
    """This transaction lost a lock conflict (wait-die) or its lock wait timed out."""


class TxHandle:
    """What a transactional method sees as ``tx``: reads and writes of one transaction
    on this shard. Reads take shared locks, writes exclusive ones; writes are buffered
    and become visible only when the transaction commits."""

    __slots__ = ("_participant", "_tx")

    def __init__(self, participant: Participant, tx: ParticipantTx) -> None:
        self._participant = participant
        self._tx = tx

    @property
    def txid(self) -> int:
        return self._tx.txid

    @property
    def shard(self) -> str:
        return self._participant.shard

    async def get(self, key: str, default: Any = None, *, for_update: bool = False) -> Any:
        """The value of ``key`` as this transaction sees it (its own writes included).

        ``for_update=True`` takes the exclusive lock at once: use it when the transaction
        will write the key, so two read-then-write transactions do not both hold a
        shared lock and then conflict on the upgrade (one of them would have to abort).
        """
        _check_key(key)
        if for_update:
            await self._participant._lock(self._tx, SCAN_RESOURCE, Mode.IX)
        await self._participant._lock(self._tx, key, Mode.X if for_update else Mode.S)
        if key in self._tx.writes:
            value = self._tx.writes[key]
            return default if value is TOMBSTONE else value
        found, value = await self._participant.store.get(key)
        return value if found else default

    async def put(self, key: str, value: Any) -> None:
        """Write ``value`` (anything CBOR can carry) to ``key`` at commit."""
        _check_key(key)
        txrpc._codec.encode_value(value)  # fail now, not at prepare, if it cannot be stored
        await self._participant._lock(self._tx, SCAN_RESOURCE, Mode.IX)
        await self._participant._lock(self._tx, key, Mode.X)
        self._participant.core.buffer_write(self._tx, key, value)

    async def delete(self, key: str) -> None:
        _check_key(key)
        await self._participant._lock(self._tx, SCAN_RESOURCE, Mode.IX)
        await self._participant._lock(self._tx, key, Mode.X)
        self._participant.core.buffer_write(self._tx, key, TOMBSTONE)

    async def scan(self, prefix: str = "", limit: int = 1000) -> list[tuple[str, Any]]:
        """(key, value) pairs with ``prefix``, in key order, this transaction's writes
        included. Locks the shard against concurrent writers (phantom protection)."""
        await self._participant._lock(self._tx, SCAN_RESOURCE, Mode.S)
        rows = dict(await self._participant.store.scan(prefix, limit=limit + len(self._tx.writes)))
        for key, value in self._tx.writes.items():
            if key.startswith(prefix):
                if value is TOMBSTONE:
                    rows.pop(key, None)
                else:
                    rows[key] = value
        return sorted(rows.items())[:limit]


def _check_key(key: Any) -> None:
    if type(key) is not str:
        raise txrpc.InvalidArgument(f"keys are strings, got {type(key).__name__}")


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _not_cancelled_midway(fn: F) -> F:
    """Run a protocol step to the end even if its caller goes away.

    A step writes a durable record and then changes the in-memory state to match; a
    cancellation between the two (the server cancels a handler when its connection
    drops) would leave them disagreeing — e.g. a commit durable on disk while memory
    still says "prepared", so a retry is told "aborted" and the locks stay held. Each
    step is bounded (a storage write, a lock-free state change), so it is shielded.
    (Found by ``txrpc chaos`` with connection resets right after a commit.)
    """

    @functools.wraps(fn)
    async def step(*args: Any, **kwargs: Any) -> Any:
        with trio.CancelScope(shield=True):
            return await fn(*args, **kwargs)

    return step  # type: ignore[return-value]


class Participant:
    """One shard's participant. Use :meth:`services` with a ``txrpc.Server`` and run
    :meth:`run` (after :meth:`recover`) in the same nursery."""

    def __init__(
        self,
        services: list[txrpc.Service],
        store: ShardStore,
        *,
        shard: str,
        coordinator: txrpc.Client | None = None,
        epoch_guard: EpochGuard | None = None,
        tx_idle_timeout_s: float = 10.0,
        decision_wait_s: float = 2.0,
        resolve_interval_s: float = 0.5,
        phase_timeout_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.shard = shard
        self.store = store
        self.core = ParticipantCore(tx_idle_timeout_s)
        self.coordinator = coordinator
        self.epoch_guard = epoch_guard
        self.decision_wait_s = decision_wait_s
        self.resolve_interval_s = resolve_interval_s
        self.phase_timeout_s = phase_timeout_s
        self.rng = rng or random.Random(0)
        self._lock_waiters: dict[tuple[int, Any], trio.Event] = {}
        self._prepared_at: dict[int, float] = {}
        self._busy: dict[int, trio.Event] = {}  # txid -> a prepare/commit/abort is writing
        self._autocommit_seq = 0
        self.user_services = [self._wrap_service(s) for s in services]
        self.internal = self._internal_service()
        self.recovered = False

    def services(self) -> list[txrpc.Service]:
        return [*self.user_services, self.internal]

    # --- recovery and background work --------------------------------------------------------

    async def recover(self) -> list[int]:
        """Reload prepare records and re-take their locks. Call before serving."""
        records = await self.store.open()
        now = trio.current_time()
        for txid, writes, locks in records:
            write_map = {key: (TOMBSTONE if deleted else value) for key, deleted, value in writes}
            self.core.restore_prepared(txid, write_map, [(r, Mode(m)) for r, m in locks], now)
            self.core.locks.mark_prepared(txid)
            self._prepared_at[txid] = -math.inf  # ask the coordinator at once
        self.recovered = True
        if records:
            log.info("shard %s recovered %d prepared transactions", self.shard, len(records))
        return [r[0] for r in records]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background duties: abort idle unprepared transactions; ask the coordinator
        about prepared ones that waited too long (termination protocol)."""
        if not self.recovered:
            await self.recover()
        task_status.started()
        while True:
            await trio.sleep(self.resolve_interval_s)
            now = trio.current_time()
            for txid in self.core.expired(now):
                log.info("shard %s: aborting idle transaction %d", self.shard, txid)
                self._wake(
                    self.core.abort(txid, "transaction idle too long on this shard (client gone?)"), txid
                )
            if self.coordinator is not None:
                for txid in self.core.in_doubt():
                    if (
                        now - self._prepared_at.get(txid, now) >= self.decision_wait_s
                        and txid not in self._busy
                    ):
                        await self._ask_decision(txid)

    async def _ask_decision(self, txid: int) -> None:
        assert self.coordinator is not None
        try:
            with trio.move_on_after(self.phase_timeout_s):
                decision = await self.coordinator.options(retries_max=0).call("coord.decision", txid)
                if decision == "commit":
                    await self.commit(txid)
                elif decision == "abort":
                    await self.abort(txid)
        except txrpc.RpcError as exc:
            log.info("shard %s: decision of %d not available yet: %s", self.shard, txid, exc)

    # --- locks ---------------------------------------------------------------------------------

    async def _lock(self, tx: ParticipantTx, resource: Any, mode: Mode) -> None:
        if tx.state is not TxState.ACTIVE:
            raise _Conflict(tx.abort_reason or f"transaction {tx.txid} is {tx.state.value}")
        outcome = self.core.locks.acquire(tx.txid, resource, mode)
        if outcome is GRANTED:
            return
        if outcome is DIE:
            raise _Conflict(f"lock conflict on {_show(resource)} with an older transaction (wait-die)")
        event = trio.Event()
        self._lock_waiters[(tx.txid, resource)] = event
        granted = False
        try:
            with trio.move_on_at(tx.deadline):
                await event.wait()
                granted = tx.state is TxState.ACTIVE and resource in self.core.locks.held_by(tx.txid)
        finally:
            self._lock_waiters.pop((tx.txid, resource), None)
            if not granted and tx.state is TxState.ACTIVE:
                self._wake(self.core.locks.cancel(tx.txid, resource))
        if not granted:
            raise _Conflict(
                tx.abort_reason or f"lock wait on {_show(resource)} reached the transaction deadline"
            )

    def _wake(self, granted: list[Request], aborted_txid: int | None = None) -> None:
        for request in granted:
            event = self._lock_waiters.get((request.txid, request.resource))
            if event is not None:
                event.set()
        if aborted_txid is not None:
            for (txid, _), event in list(self._lock_waiters.items()):
                if txid == aborted_txid:
                    event.set()

    # --- user methods --------------------------------------------------------------------------

    def _wrap_service(self, service: txrpc.Service) -> txrpc.Service:
        wrapped = txrpc.Service()
        for name, spec in service.methods.items():
            if spec.options.get("transactional"):
                handler = self._transactional_handler(spec)
                wrapped.add_method(handler, name=name, transactional=True, allow=spec.allow)
            else:
                wrapped.methods[name] = spec
        return wrapped

    def _transactional_handler(self, spec: MethodSpec) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(spec.fn)
        async def handler(*args: Any, **kwargs: Any) -> Any:
            ctx = txrpc.current_call()
            if self.epoch_guard is not None and "epoch" in ctx.metadata and args:
                self.epoch_guard.check(key=args[0])  # WRONG_EPOCH / not the primary: nothing ran
            txid = ctx.metadata.get("txid")
            if txid is None:
                return await self._autocommit(spec, args, kwargs, ctx.deadline)
            if type(txid) is not int or txid <= 0:
                raise txrpc.InvalidArgument("metadata 'txid' must be a positive integer")
            op_seq = ctx.metadata.get("op_seq", 0)
            tx = self.core.txs.get(txid)
            if ctx.secured and tx is not None and tx.owner and tx.owner != ctx.identity:
                # One caller cannot slip operations into another caller's transaction.
                raise txrpc.PermissionDenied(
                    f"transaction {txid} belongs to another caller", {"not_started": True}
                )
            age = ctx.metadata.get("age")
            if type(age) is int and 0 < age <= txid:
                self.core.locks.set_age(txid, age)
            return await self._run_operation(spec, txid, op_seq, args, kwargs, ctx.deadline, ctx.identity)

        return handler

    async def _run_operation(
        self,
        spec: MethodSpec,
        txid: int,
        op_seq: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float,
        owner: str = "",
    ) -> Any:
        now = trio.current_time()
        action, value = self.core.begin_operation(txid, op_seq, now, deadline)
        if action == "replay":
            ok, stored = value
            if ok:
                return stored
            code, message, details = stored
            raise txrpc.RpcError.from_wire(code, message, details)
        if action == "refuse":
            raise txrpc.TransactionAborted(str(value), {"txid": txid, "retryable": True})
        tx: ParticipantTx = value
        if not tx.owner:
            tx.owner = owner
        finished = False
        try:
            error: txrpc.RpcError
            try:
                result = await spec.fn(TxHandle(self, tx), *args, **kwargs)
            except txrpc.Abort as exc:
                error = txrpc.TransactionAborted(
                    exc.message or "aborted by the method",
                    {"txid": txid, "retryable": False, "user_abort": True},
                )
            except _Conflict as exc:
                error = txrpc.TransactionAborted(str(exc), {"txid": txid, "retryable": True})
            except txrpc.RpcError as exc:
                error = exc
            except Exception as exc:
                log.exception("transactional method %s failed (transaction %d)", spec.name, txid)
                error = txrpc.Internal(f"{type(exc).__name__}: {exc}")
            else:
                self.core.end_operation(tx, op_seq, True, result, trio.current_time())
                finished = True
                return result
            # Any failure of an operation aborts its transaction here (no partial operation
            # effects survive); the caller learns why.
            self.core.end_operation(
                tx, op_seq, False, (int(error.code), error.message, error.details), trio.current_time()
            )
            finished = True
            self._wake(self.core.abort(txid, error.message), txid)
            raise error
        finally:
            if not finished:  # cancelled (deadline or caller gone): the transaction cannot go on
                self.core.end_operation(
                    tx,
                    op_seq,
                    False,
                    (int(txrpc.Code.CANCELLED), "operation cancelled", {}),
                    trio.current_time(),
                )
                self._wake(self.core.abort(txid, "an operation was cancelled"), txid)

    async def _autocommit(
        self, spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any], deadline: float
    ) -> Any:
        """A transactional method called outside a transaction: its own local transaction."""
        last: BaseException | None = None
        for attempt in range(AUTOCOMMIT_ATTEMPTS_MAX):
            self._autocommit_seq += 1
            txid = AUTOCOMMIT_TXID_BASE + self._autocommit_seq
            try:
                result = await self._run_operation(spec, txid, 0, args, kwargs, deadline)
            except txrpc.TransactionAborted as exc:
                if not exc.retryable:
                    raise
                last = exc
                await trio.sleep(0.001 * 2**attempt * self.rng.uniform(0.5, 1.0))
                continue
            outcome = await self.commit_one_phase(txid)
            if outcome["outcome"] == "committed":
                return result
            last = txrpc.TransactionAborted(outcome.get("reason", "aborted"), {"retryable": True})
        assert last is not None
        raise last

    # --- the coordinator's messages ------------------------------------------------------------

    def _internal_service(self) -> txrpc.Service:
        # The coordinator's messages are internal to the cluster: on a server with
        # security, only peers may send them (a client forging tx.commit/tx.abort could
        # decide other callers' transactions). tx.status is read-only: clients ask it
        # for a one-phase outcome (Cluster.outcome).
        svc = txrpc.Service("tx")
        svc.add_method(self.prepare, name="prepare", allow=txrpc.ROLE_PEER)
        svc.add_method(self.commit, name="commit", allow=txrpc.ROLE_PEER)
        # A client aborts, or commits in one phase, its own transaction at the shard (the
        # single-shard fast path); anyone else's only a peer may.
        svc.add_method(self._abort_from_caller, name="abort")
        svc.add_method(self._commit_one_phase_from_caller, name="commit_one_phase")
        svc.add_method(self.status, name="status")
        return svc

    def _check_caller_may_decide(self, txid: int, what: str) -> None:
        """On a server with security: peers may decide any transaction; another caller
        only its own (the identity that ran its operations here), and never one that is
        prepared (the coordinator decides those)."""
        ctx = txrpc.current_call()
        if not ctx.secured or not ctx.roles.isdisjoint(txrpc.ROLE_PEER):
            return
        if type(txid) is not int or txid <= 0:
            raise txrpc.InvalidArgument("txid must be a positive integer")
        tx = self.core.txs.get(txid)
        if tx is None:
            return  # unknown or finished here: the answer reveals and changes nothing
        if tx.owner != ctx.identity:
            raise txrpc.PermissionDenied(
                f"{ctx.identity!r} may not {what} transaction {txid}: it belongs to another caller",
                {"not_started": True},
            )
        if tx.state is TxState.PREPARED:
            raise txrpc.PermissionDenied(
                f"transaction {txid} is prepared: only the coordinator decides it", {"not_started": True}
            )

    async def _abort_from_caller(self, txid: int) -> str:
        self._check_caller_may_decide(txid, "abort")
        return await self.abort(txid)

    async def _commit_one_phase_from_caller(self, txid: int) -> dict[str, Any]:
        self._check_caller_may_decide(txid, "commit")
        return await self.commit_one_phase(txid)

    async def _serialize(self, txid: int) -> None:
        """Wait while another protocol message of ``txid`` is writing."""
        while (event := self._busy.get(txid)) is not None:
            await event.wait()

    @_not_cancelled_midway
    async def prepare(self, txid: int) -> dict[str, Any]:
        """Phase 1: vote. A yes vote means the prepare record is durable."""
        await self._serialize(txid)
        action, vote, reason, granted = self.core.prepare(txid)
        assert action is not PrepareAction.WAIT, "prepare writes are serialized per txid"
        if action is PrepareAction.VOTE:
            assert vote is not None
            self._wake(granted, txid if vote is Vote.NO else None)
            return {"vote": vote.value, "reason": reason}
        assert action is PrepareAction.WRITE_RECORD
        tx = self.core.txs[txid]
        writes = [(k, v is TOMBSTONE, None if v is TOMBSTONE else v) for k, v in tx.writes.items()]
        locks = [(resource, mode.value) for resource, mode in self.core.locks.held_by(txid).items()]
        self._busy[txid] = done = trio.Event()
        try:
            if _env.buggify("participant.slow_prepare"):
                await trio.sleep(self.rng.uniform(0.0, self.phase_timeout_s))
            try:
                await self.store.write_prepare(txid, writes, locks)
            except Exception as exc:
                log.error("shard %s: prepare record of %d not written: %s", self.shard, txid, exc)
                self.core.prepare_failed(txid, f"prepare record not durable: {exc}")
                self._wake([], txid)
                return {"vote": "no", "reason": f"prepare record not durable: {exc}"}
            if not self.core.prepared(txid):  # aborted while the record was being written
                await self.store.delete_prepare(txid)
                return {"vote": "no", "reason": "aborted during prepare"}
            self.core.locks.mark_prepared(txid)
            self._prepared_at[txid] = trio.current_time()
            if _env.broken("participant.release_locks_at_prepare"):
                # Test-only broken protocol (simulator): others may read and overwrite
                # what this transaction is about to commit.
                self._wake(self.core.locks.release_all(txid))
            crash_point("participant.after_prepare")
            return {"vote": "yes", "reason": ""}
        finally:
            del self._busy[txid]
            done.set()

    @_not_cancelled_midway
    async def commit(self, txid: int) -> str:
        """Phase 2 commit (idempotent): apply, log and release; answers ``"ok"``."""
        await self._serialize(txid)
        action = self.core.commit(txid)
        if action is CommitAction.ACK:
            return "ok"
        if action is CommitAction.CHECK_LOG:
            if await self.store.is_committed(txid):
                return "ok"
            raise txrpc.FailedPrecondition(
                f"commit of transaction {txid}, which is not prepared on shard {self.shard}"
            )
        crash_point("participant.before_commit_apply")
        await self._apply(txid)
        if _env.buggify("participant.slow_commit_ack"):
            await trio.sleep(self.rng.uniform(0.0, self.phase_timeout_s))
        return "ok"

    async def _apply(self, txid: int) -> None:
        tx = self.core.txs[txid]
        writes = [(k, v is TOMBSTONE, None if v is TOMBSTONE else v) for k, v in tx.writes.items()]
        if not writes:  # read-only: nothing to make durable, no commit-log entry
            self._wake(self.core.committed(txid))
            return
        self._busy[txid] = done = trio.Event()
        try:
            await self.store.apply_commit(txid, writes)
            self._prepared_at.pop(txid, None)
            self._wake(self.core.committed(txid))
        finally:
            del self._busy[txid]
            done.set()

    @_not_cancelled_midway
    async def abort(self, txid: int) -> str:
        """Phase 2 abort (idempotent)."""
        await self._serialize(txid)
        tx = self.core.txs.get(txid)
        if tx is not None and tx.state is TxState.PREPARED:
            await self.store.delete_prepare(txid)
        self._prepared_at.pop(txid, None)
        self._wake(self.core.abort(txid, "aborted by the coordinator"), txid)
        return "ok"

    @_not_cancelled_midway
    async def commit_one_phase(self, txid: int) -> dict[str, Any]:
        """The only participant: commit locally at once (idempotent)."""
        await self._serialize(txid)
        ok, reason = self.core.one_phase_ready(txid)
        if not ok:
            if txid not in self.core.txs and await self.store.is_committed(txid):
                return {"outcome": "committed", "reason": "already committed"}
            self._wake(self.core.abort(txid, reason), txid)
            return {"outcome": "aborted", "reason": reason}
        if reason == "already committed":
            return {"outcome": "committed", "reason": reason}
        self.core.locks.mark_prepared(txid)
        tx = self.core.txs[txid]
        tx.state = TxState.PREPARED
        try:
            await self._apply(txid)
        except Exception as exc:
            self._wake(self.core.abort(txid, f"commit not durable: {exc}"), txid)
            return {"outcome": "aborted", "reason": f"commit not durable: {exc}"}
        return {"outcome": "committed", "reason": ""}

    async def status(self, txid: int | None = None) -> dict[str, Any]:
        """The shard's status; with ``txid``, that transaction's state here (see
        :meth:`_tx_status`)."""
        if txid is not None:
            return await self._tx_status(txid)
        position, digest = await self.store.digest()
        return {
            "shard": self.shard,
            "active": sum(1 for t in self.core.txs.values() if t.state is TxState.ACTIVE),
            "prepared": self.core.in_doubt(),
            "position": position,
            "digest": digest,
        }

    async def _tx_status(self, txid: int) -> dict[str, Any]:
        """``{"txid", "state"}``: ``active`` (may still commit or abort), ``prepared``
        (the coordinator decides), ``committed`` (in the commit log), ``read_only``
        (committed with nothing written, or left after phase 1 as a read-only voter) or
        ``aborted``. A txid unknown here is answered ``aborted`` and remembered as such,
        so a late first operation or one-phase commit of it is refused: the answer stands."""
        if type(txid) is not int or txid <= 0:
            raise txrpc.InvalidArgument("txid must be a positive integer")
        while True:
            await self._serialize(txid)
            tx = self.core.txs.get(txid)
            if tx is not None:
                return {"txid": txid, "state": "prepared" if tx.state is TxState.PREPARED else "active"}
            final = self.core.finished.get(txid)
            logged = await self.store.is_committed(txid)
            if txid not in self.core.txs and self.core.finished.get(txid) is final:
                break  # nothing changed during the read
        if logged:
            return {"txid": txid, "state": "committed"}
        if final is TxState.COMMITTED:
            return {"txid": txid, "state": "read_only"}
        self.core.abort(txid, "unknown when its outcome was asked")  # no locks: only remembered
        return {"txid": txid, "state": "aborted"}


def _show(resource: Any) -> str:
    return "the shard (scan)" if resource == SCAN_RESOURCE else repr(resource)
