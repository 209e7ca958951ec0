"""The participant runtime: a shard primary hosting ``@service.transactional`` methods.

Runs the user's handlers with a :class:`TxHandle` bound to the caller's transaction,
takes locks (strict 2PL, wait-die), buffers writes, and answers the coordinator's
``tx.prepare`` / ``tx.commit`` / ``tx.abort`` / ``tx.commit_one_phase``. Decisions come
from :class:`ParticipantCore`; durability from :class:`storage.ShardStore`.
"""

from __future__ import annotations

import ast
import collections
import functools
import inspect
import logging
import math
import random
import textwrap
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

import txrpc
from storage import BatchFailed, ShardStore, StorageClosed, stopping
from storage._shard_store import WriteSet
from txrpc import _env
from txrpc._routing import EPOCH_METADATA_KEY, EpochGuard
from txrpc._service import NOT_NOW, MethodSpec, _current_call_or_none
from txrpc._shardmap import ShardMap

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
from ._replication import ORIGIN_SLOTS, Plan, Replication, record_id, txid_of

log = logging.getLogger("txrpc.participant")

AUTOCOMMIT_TXID_BASE = 2**62  # local single-shard transactions: always younger than any coordinator txid
AUTOCOMMIT_ATTEMPTS_MAX = 5



COMMIT_MANY_MAX = 1024
"""Transactions in one ``tx.commit_many`` (the coordinator sends at most 256)."""
GROUP_RECORDS_MAX = 256
"""Records of one batch message taken together as one queued write of the group commit
(at most: the appender bounds its batches and queue by queued writes, so a group's size
is bounded here); the rest of the message goes one by one."""
BATCH_ANSWER_S = 1.0
"""``tx.prepare_many`` / ``repl.prepare_many`` answer by then (or by half the call's
remaining time): steps still running are answered ``PENDING``."""
PENDING = "PENDING"

class _Conflict(Exception):
    """This transaction lost a lock conflict (wait-die) or its lock wait timed out."""


# Values CBOR always carries (a put checks any other by encoding it).
_ALWAYS_ENCODABLE = frozenset({int, bytes, float, bool, type(None)})  # (not str: a lone surrogate)


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
        tx = self._tx
        if for_update:
            await self._take(SCAN_RESOURCE, Mode.IX)
        await self._take(key, Mode.X if for_update else Mode.S)
        if key in tx.writes:
            value = tx.writes[key]
            return default if value is TOMBSTONE else value
        found, value = await self._read(key)
        return value if found else default

    async def put(self, key: str, value: Any) -> None:
        """Write ``value`` (anything CBOR can carry) to ``key`` at commit."""
        _check_key(key)
        if type(value) not in _ALWAYS_ENCODABLE:
            txrpc._codec.encode_value(value)  # fail now, not at prepare, if it cannot be stored
        await self._take(SCAN_RESOURCE, Mode.IX)
        await self._take(key, Mode.X)
        self._participant.core.buffer_write(self._tx, key, value)

    async def _take(self, resource: Any, mode: Mode) -> None:
        """The lock, granted at once in the usual case (no wait), else waited for."""
        participant, tx = self._participant, self._tx
        if not participant._lock_at_once(tx, resource, mode):
            await participant._lock(tx, resource, mode)

    async def _read(self, key: str) -> tuple[bool, Any]:
        return await self._participant.store.get(key)

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


class _LockWait:
    """The tasks of one transaction waiting for one resource (usually one; a method may
    wait from several tasks of its own): one event wakes them all."""

    __slots__ = ("event", "waiters")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.waiters = 0


class _WouldWait(BaseException):
    """An operation tried on the read loop (:class:`_NowTxHandle`) would have to wait.
    (A BaseException: a method's ``except Exception`` must not swallow it.)"""


class _NowTxHandle(TxHandle):
    """:class:`TxHandle` for an operation tried at once (``Participant._try_operation_now``):
    ``get``/``put`` that find their locks free (and a read its value in memory) complete
    without suspending; anything else raises :class:`_WouldWait` before it does
    anything, and the operation is undone and run in a task."""

    __slots__ = ("waited",)

    def __init__(self, participant: Participant, tx: ParticipantTx) -> None:
        super().__init__(participant, tx)
        self.waited = False  # an operation raised _WouldWait (whatever the method did with it)

    def _would_wait(self) -> _WouldWait:
        self.waited = True
        return _WouldWait()

    async def _take(self, resource: Any, mode: Mode) -> None:
        if self.waited or not self._participant._lock_now(self._tx, resource, mode):
            raise self._would_wait()

    async def _read(self, key: str) -> tuple[bool, Any]:
        cached = self._participant.store.get_cached(key)
        if cached is None:
            raise self._would_wait()  # a read from the database
        return cached

    async def delete(self, key: str) -> None:
        raise self._would_wait()

    async def scan(self, prefix: str = "", limit: int = 1000) -> list[tuple[str, Any]]:
        raise self._would_wait()


def _stopping() -> list[Any]:
    """A replicated record's answer when the node's storage closed under it (it is stopping)."""
    return [int(txrpc.Code.UNAVAILABLE), "the node is stopping", {}]


def _repl_share(txid: Any, writes: Any, origin: Any) -> WriteSet:
    """A replicated prepare record's arguments checked; its write set."""
    if type(txid) is not int or txid <= 0:
        raise txrpc.InvalidArgument("txid must be a positive integer")
    if not isinstance(writes, list) or not all(
        isinstance(w, list) and len(w) == 3 and isinstance(w[0], str) and isinstance(w[1], bool) for w in writes
    ):
        raise txrpc.InvalidArgument("writes must be a list of [key, deleted, value]")
    if not isinstance(origin, str) or not origin:
        raise txrpc.InvalidArgument("origin must name the sending primary")
    return [(k, d, None if d else v) for k, d, v in writes]


_TX_OPERATIONS = frozenset({"get", "put", "delete", "scan"})


def awaits_only_its_transaction(fn: Callable[..., Any]) -> bool:
    """Does the transactional method ``fn`` wait on nothing but its transaction's
    operations? True only for a plain ``async def`` whose every ``await`` is
    ``await tx.get/put/delete/scan(...)`` on its first parameter (never rebound), with
    no ``async for``/``async with`` and no nested function. Such a method's waits are
    lock waits, each bounded by the transaction's deadline (which the call's deadline
    caps), so the server needs no cancel scope to end it (``bounded=True``). Anything
    not inspected (no source, a decorated wrapper, a callable object) answers False."""
    target = getattr(fn, "__func__", fn)
    if not inspect.iscoroutinefunction(target) or getattr(target, "__wrapped__", None) is not None:
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(target)))
    except (OSError, TypeError, SyntaxError):
        return False
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.AsyncFunctionDef):
        return False
    function = tree.body[0]
    params = function.args.posonlyargs + function.args.args
    skip = 1 if inspect.ismethod(fn) else 0  # a bound method: the transaction comes after self
    if len(params) <= skip or function.name != target.__name__:
        return False
    tx = params[skip].arg
    for node in ast.walk(function):
        if node is not function and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            return False
        if isinstance(node, (ast.AsyncFor, ast.AsyncWith, ast.Global, ast.Nonlocal, ast.Import, ast.ImportFrom)):
            return False
        if isinstance(node, ast.comprehension) and node.is_async:
            return False  # ``[x async for x in ...]`` waits on the iterator
        if isinstance(node, ast.Name) and node.id == tx and not isinstance(node.ctx, ast.Load):
            return False  # rebound or deleted: ``tx`` may be something else at an await
        if isinstance(node, ast.ExceptHandler) and node.name == tx:
            return False  # ``except E as tx`` rebinds it too
        if isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name == tx:
            return False
        if isinstance(node, ast.MatchMapping) and node.rest == tx:
            return False
        if isinstance(node, ast.Await):
            call = node.value
            if not (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id == tx
                and call.func.attr in _TX_OPERATIONS
            ):
                return False
    return True


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
            try:
                return await fn(*args, **kwargs)
            except StorageClosed:
                # The node is stopping under the step: what is durable stays durable and
                # recovery finishes the rest; the caller learns it did not complete here.
                raise txrpc.Unavailable("the shard is stopping") from None

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
        replication: Replication | None = None,
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
        self._lock_waiters: dict[tuple[int, Any], _LockWait] = {}
        # Transactions with an operation running in a task here -> the operations of it
        # waiting for their turn (one operation of a transaction runs at a time: _turn).
        self._turns: dict[int, collections.deque[trio.Event]] = {}
        self._prepared_at: dict[int, float] = {}
        self._busy: dict[int, trio.Event] = {}  # txid -> a prepare/commit/abort is writing
        # Steps a batch handler answered PENDING finish here (see _each_answered).
        self._background: trio.Nursery | None = None
        self._autocommit_seq = 0
        self.user_services = [self._wrap_service(s) for s in services]
        self.internal = self._internal_service()
        self.recovered = False
        self.replication = replication
        self._leased_txids: list[int] = []
        # Replicated records held for other primaries: the epoch each was taken at (a
        # catch-up drops the older ones), until it commits or aborts here.
        self._replicated_epoch: dict[int, int] = {}
        #: Own prepared transactions: the followers that took their prepare record.
        self._holders: dict[int, list[str]] = {}
        if replication is not None:
            replication.participant = self

    def services(self) -> list[txrpc.Service]:
        extra = [self._replication_service()] if self.replication is not None else []
        return [*self.user_services, self.internal, *extra]

    def _replicated(self) -> bool:
        return self.replication is not None and self.replication.guard.shard_map.replication_factor > 1

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
            meta = self.store.record_meta.get(txid, {})
            if txid < 0 and self.replication is not None:
                self.replication.restore_origin(txid, meta.get("origin"))
            if txid < 0 and type(meta.get("epoch")) is int:
                self._replicated_epoch[txid] = meta["epoch"]  # (a catch-up keeps one of its epoch)
        self.recovered = True
        if records:
            log.info("shard %s recovered %d prepared transactions", self.shard, len(records))
        return [r[0] for r in records]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background duties: abort idle unprepared transactions; ask the coordinator
        about prepared ones that waited too long (termination protocol)."""
        if not self.recovered:
            await self.recover()
        async with trio.open_nursery() as background:
            self._background = background
            task_status.started()
            try:
                await self._resolve_loop()
            finally:
                self._background = None

    async def _resolve_loop(self) -> None:
        while True:
            await trio.sleep(self.resolve_interval_s)
            now = trio.current_time()
            for txid in self.core.expired(now):
                log.info("shard %s: aborting idle transaction %d", self.shard, txid)
                self._wake(
                    self.core.abort(txid, "transaction idle too long on this shard (client gone?)"), txid
                )
            for txid in self.core.in_doubt():
                if now - self._prepared_at.get(txid, now) < self.decision_wait_s or txid in self._busy:
                    continue
                if self.coordinator is not None:
                    await self._ask_decision(txid)

    async def _ask_decision(self, txid: int) -> None:
        assert self.coordinator is not None
        try:
            with trio.move_on_after(self.phase_timeout_s):
                # A replicated record (follower side) is kept under -txid: ask about txid.
                decision = await self.coordinator.options(retries_max=0).call("coord.decision", txid_of(txid))
                if decision == "commit":
                    await self.commit(txid)
                elif decision == "abort":
                    await self.abort(txid)
        except txrpc.RpcError as exc:
            log.info("shard %s: decision of %d not available yet: %s", self.shard, txid, exc)

    # --- locks ---------------------------------------------------------------------------------

    def _lock_at_once(self, tx: ParticipantTx, resource: Any, mode: Mode) -> bool:
        """Take the lock if it is granted at once (the usual case, without a coroutine);
        False: nothing was done, :meth:`_lock` decides (wait, die, or refuse)."""
        return tx.state is TxState.ACTIVE and self.core.locks.acquire_if_free(tx.txid, resource, mode)

    def _lock_now(self, tx: ParticipantTx, resource: Any, mode: Mode) -> bool:
        """:meth:`_lock` without waiting: True if granted now (the lock table's full rules,
        an upgrade included); False if it would have to wait (nothing is left queued);
        raises :class:`_Conflict` where :meth:`_lock` would (wait-die: die)."""
        if self._lock_at_once(tx, resource, mode):
            return True
        if tx.state is not TxState.ACTIVE:
            raise _Conflict(tx.abort_reason or f"transaction {tx.txid} is {tx.state.value}")
        outcome = self.core.locks.acquire(tx.txid, resource, mode)
        if outcome is GRANTED:
            return True
        if outcome is DIE:
            raise _Conflict(f"lock conflict on {_show(resource)} with an older transaction (wait-die)")
        self._wake(self.core.locks.cancel(tx.txid, resource))  # queued: withdrawn, waited for in a task
        return False

    async def _lock(self, tx: ParticipantTx, resource: Any, mode: Mode) -> None:
        """Take ``mode`` on ``resource`` for ``tx``, waiting (wait-die) until it is granted
        or the transaction's deadline. One operation of a transaction runs at a time here
        (:meth:`_turn`), but a method may wait for one resource from several tasks of its
        own: they share one wait (a :class:`_LockWait`), and the queued request is
        withdrawn only when the last of them gives up."""
        key = (tx.txid, resource)
        while True:
            if tx.state is not TxState.ACTIVE:
                raise _Conflict(tx.abort_reason or f"transaction {tx.txid} is {tx.state.value}")
            if self.core.locks.acquire_if_free(tx.txid, resource, mode):
                return  # (also: held strongly enough already, while a sibling waits for more)
            if key not in self._lock_waiters:  # (else a request of this transaction is queued)
                outcome = self.core.locks.acquire(tx.txid, resource, mode)
                if outcome is GRANTED:
                    return
                if outcome is DIE:
                    raise _Conflict(f"lock conflict on {_show(resource)} with an older transaction (wait-die)")
            wait = self._lock_waiters.get(key)
            if wait is None:
                wait = self._lock_waiters[key] = _LockWait()
            wait.waiters += 1
            woken = False
            try:
                with trio.move_on_at(tx.deadline):
                    await wait.event.wait()
                    woken = True
            finally:
                wait.waiters -= 1
                # The last one waiting gives up: its request is withdrawn, unless the wait
                # ended meanwhile (granted, or aborted: then a request queued since is a
                # newer wait's, not this one's).
                if not woken and wait.waiters == 0 and self._lock_waiters.get(key) is wait:
                    del self._lock_waiters[key]
                    if tx.state is TxState.ACTIVE:
                        self._wake(self.core.locks.cancel(tx.txid, resource))
            if not woken:
                raise _Conflict(
                    tx.abort_reason or f"lock wait on {_show(resource)} reached the transaction deadline"
                )
            if tx.state is TxState.ACTIVE and self.core.locks.acquire_if_free(tx.txid, resource, mode):
                return  # granted (strongly enough for this operation: a sibling may have wanted less)

    def _wake(self, granted: list[Request], aborted_txid: int | None = None) -> None:
        waits = self._lock_waiters
        for request in granted:
            wait = waits.pop((request.txid, request.resource), None)
            if wait is not None:
                wait.event.set()
        if aborted_txid is not None:
            for key in [key for key in waits if key[0] == aborted_txid]:
                waits.pop(key).event.set()
        if self.replication is not None:
            self.replication.locks_changed()

    # --- user methods --------------------------------------------------------------------------

    def _wrap_service(self, service: txrpc.Service) -> txrpc.Service:
        wrapped = txrpc.Service()
        for name, spec in service.methods.items():
            if spec.options.get("transactional"):
                handler = self._transactional_handler(spec)
                # A method that waits only on its transaction runs without a cancel scope
                # per call (specs/commit-protocol.md, "Handlers without a cancel scope").
                bounded = awaits_only_its_transaction(spec.fn)
                added = wrapped.add_method(handler, name=name, transactional=True, allow=spec.allow, bounded=bounded)
                if bounded:
                    # Its operations can also be tried on the read loop, without a task.
                    added.try_now = functools.partial(self._try_operation_now, spec)
            else:
                wrapped.methods[name] = spec
        return wrapped

    def _transactional_handler(self, spec: MethodSpec) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(spec.fn)
        async def handler(*args: Any, **kwargs: Any) -> Any:
            ctx = txrpc.current_call()
            epoch: int | None = None
            if self.epoch_guard is not None and "epoch" in ctx.metadata and args:
                if self.replication is not None:
                    await self.replication.follow_call_epoch()  # the caller may know a newer map
                epoch = self.epoch_guard.check(key=args[0]).epoch  # WRONG_EPOCH / not the primary: nothing ran
            txid = ctx.metadata.get("txid")
            if txid is None:
                # Its own transaction, committed here: its calls to the coordinator and
                # its retries are bounded by the call's deadline (the server gives a
                # bounded method no scope of its own).
                with trio.CancelScope(deadline=ctx.deadline):
                    return await self._autocommit(spec, args, kwargs, ctx.deadline, epoch)
                raise txrpc.DeadlineExceeded(f"{spec.name}: the call's deadline passed on shard {self.shard}")
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
            return await self._run_operation(spec, txid, op_seq, args, kwargs, ctx.deadline, ctx.identity, epoch)

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
        epoch: int | None = None,
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
        if tx.epoch is None and epoch is not None:
            tx.epoch = epoch  # (prepare refuses it if the map has changed since)
        finished = False
        turn = False
        try:
            try:
                await self._turn(tx)
                turn = True
                result = await spec.fn(TxHandle(self, tx), *args, **kwargs)
            except Exception as exc:
                finished = True
                raise self._operation_failed(spec, tx, op_seq, exc) from None
            self.core.end_operation(tx, op_seq, True, result, trio.current_time())
            finished = True
            return result
        finally:
            if turn:
                self._next_turn(txid)
            if not finished:  # cancelled (deadline or caller gone): the transaction cannot go on
                self.core.end_operation(
                    tx,
                    op_seq,
                    False,
                    (int(txrpc.Code.CANCELLED), "operation cancelled", {}),
                    trio.current_time(),
                )
                self._wake(self.core.abort(txid, "an operation was cancelled"), txid)

    async def _turn(self, tx: ParticipantTx) -> None:
        """Wait until no other operation of ``tx`` runs here (the waiting ones in the
        order they got here), bounded by its deadline. Operations of one transaction may
        be sent at once, but each runs alone at a shard, as a statement of an SQL
        transaction does: a method's read, then write of a key is not interleaved with a
        sibling's (a withdrawal would otherwise overwrite another's when both read the
        balance before either wrote it)."""
        waiting = self._turns.get(tx.txid)
        if waiting is None:
            self._turns[tx.txid] = collections.deque()
            return
        turn = trio.Event()
        waiting.append(turn)
        try:
            with trio.move_on_at(tx.deadline):
                await turn.wait()
        except BaseException:  # cancelled while waiting
            if turn.is_set():
                self._next_turn(tx.txid)  # handed over, but this one is leaving: pass it on
            else:
                waiting.remove(turn)
            raise
        if not turn.is_set():
            waiting.remove(turn)
            raise _Conflict(f"waiting for another operation of transaction {tx.txid} reached its deadline")
        if tx.state is not TxState.ACTIVE:
            self._next_turn(tx.txid)
            raise _Conflict(tx.abort_reason or f"transaction {tx.txid} is {tx.state.value}")

    def _next_turn(self, txid: int) -> None:
        """The operation that had ``txid``'s turn here is done: the next waiting one goes."""
        waiting = self._turns.get(txid)
        if waiting is None:
            return
        if waiting:
            waiting.popleft().set()
        else:
            del self._turns[txid]

    def _operation_failed(self, spec: MethodSpec, tx: ParticipantTx, op_seq: int, exc: Exception) -> txrpc.RpcError:
        """Operation ``op_seq`` of ``tx`` raised ``exc``: any failure of an operation aborts
        its transaction here (no partial operation effects survive); returns the error
        the caller learns why by."""
        txid = tx.txid
        error: txrpc.RpcError
        if isinstance(exc, txrpc.Abort):
            error = txrpc.TransactionAborted(
                exc.message or "aborted by the method", {"txid": txid, "retryable": False, "user_abort": True}
            )
        elif isinstance(exc, _Conflict):
            error = txrpc.TransactionAborted(str(exc), {"txid": txid, "retryable": True})
        elif isinstance(exc, txrpc.RpcError):
            error = exc
        else:
            log.error("transactional method %s failed (transaction %d)", spec.name, txid, exc_info=exc)
            error = txrpc.Internal(f"{type(exc).__name__}: {exc}")
        self.core.end_operation(tx, op_seq, False, (int(error.code), error.message, error.details), trio.current_time())
        self._wake(self.core.abort(txid, error.message), txid)
        return error

    def _try_operation_now(self, spec: MethodSpec, args: Any, kwargs: dict[str, Any]) -> Any:
        """``MethodSpec.try_now`` of a transactional method that waits only on its
        transaction (:func:`awaits_only_its_transaction`): the operation run to its end
        here if none of its steps must wait, else ``NOT_NOW`` with nothing of it left
        but the locks it took (its transaction keeps them; the run in a task takes
        them again at once). The common case of :meth:`_transactional_handler`'s
        handler and :meth:`_run_operation`, without a task."""
        ctx = txrpc.current_call()
        metadata = ctx.metadata
        txid = metadata.get("txid")
        if type(txid) is not int or txid <= 0:
            return NOT_NOW  # outside a transaction (or a bad id): the handler's path
        epoch: int | None = None
        if self.epoch_guard is not None and "epoch" in metadata and args:
            call_epoch = metadata.get(EPOCH_METADATA_KEY)
            if self.replication is not None and type(call_epoch) is int and call_epoch > self.epoch_guard.epoch:
                return NOT_NOW  # a newer map to fetch first
            epoch = self.epoch_guard.check(key=args[0]).epoch  # WRONG_EPOCH / not the primary: nothing ran
        op_seq = metadata.get("op_seq", 0)
        tx = self.core.txs.get(txid)
        if tx is not None:
            if ctx.secured and tx.owner and tx.owner != ctx.identity:
                return NOT_NOW  # (refused by the handler)
            if tx.state is not TxState.ACTIVE or op_seq in tx.op_results:
                return NOT_NOW  # a replay or a refusal: the handler's path
            if txid in self._turns:
                return NOT_NOW  # another operation of it runs (in a task): this one waits its turn
            writes = dict(tx.writes)
        else:
            writes = {}
        age = metadata.get("age")
        if type(age) is int and 0 < age <= txid:
            self.core.locks.set_age(txid, age)
        action, value = self.core.begin_operation(txid, op_seq, trio.current_time(), ctx.deadline)
        if action != "run":
            return NOT_NOW  # (begin_operation changed nothing then, but for a new entry)
        tx = value
        if not tx.owner:
            tx.owner = ctx.identity
        if tx.epoch is None and epoch is not None:
            tx.epoch = epoch
        handle = _NowTxHandle(self, tx)
        try:
            coroutine = spec.fn(handle, *args, **kwargs)
            coroutine.send(None)
        except StopIteration as done:
            if not handle.waited:
                self.core.end_operation(tx, op_seq, True, done.value, trio.current_time())
                return done.value
        except _WouldWait:
            pass
        except Exception as exc:
            if not handle.waited:
                raise self._operation_failed(spec, tx, op_seq, exc) from None
        else:
            # It suspended: it waited on something other than its transaction, which
            # awaits_only_its_transaction rules out. Not recoverable here: the operation
            # fails (and its transaction aborts) rather than hang.
            coroutine.close()
            failure = RuntimeError(f"{spec.name} suspended on the read loop (it must wait only on its transaction)")
            raise self._operation_failed(spec, tx, op_seq, failure) from None
        # An operation had to wait (the method may have caught that and gone on): undone,
        # it runs again in a task.
        tx.writes = writes
        tx.running_ops -= 1
        return NOT_NOW

    async def _autocommit(
        self,
        spec: MethodSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float,
        epoch: int | None = None,
    ) -> Any:
        """A transactional method called outside a transaction: its own local transaction."""
        last: BaseException | None = None
        for attempt in range(AUTOCOMMIT_ATTEMPTS_MAX):
            txid = await self._next_autocommit_txid()
            if attempt and epoch is not None and self.epoch_guard is not None:
                epoch = self.epoch_guard.check(key=args[0]).epoch  # (a retry: the map may have moved)
            try:
                result = await self._run_operation(spec, txid, 0, args, kwargs, deadline, epoch=epoch)
            except txrpc.TransactionAborted as exc:
                if not exc.retryable:
                    raise
                last = exc
                await trio.sleep(0.001 * 2**attempt * self.rng.uniform(0.5, 1.0))
                continue
            if self._replicated():
                assert self.coordinator is not None  # _next_autocommit_txid checked it
                try:
                    await self.coordinator.options(retries_max=0).call("coord.commit", txid, [self.shard])
                    return result
                except txrpc.Aborted as exc:  # (TransactionAborted arrives as its wire code)
                    # The coordinator's word: aborted. Its locks go now, not at the idle
                    # timeout (later calls on the key would die meanwhile).
                    await self.abort(txid)
                    if exc.details.get("unknown_txid"):
                        # Leased from a coordinator that has forgotten them (it restarted).
                        self._leased_txids.clear()
                    if not exc.details.get("retryable"):
                        raise
                    last = exc
                    continue
            outcome = await self.commit_one_phase(txid)
            if outcome["outcome"] == "committed":
                return result
            last = txrpc.TransactionAborted(outcome.get("reason", "aborted"), {"retryable": True})
        assert last is not None
        raise last

    async def _next_autocommit_txid(self) -> int:
        """A local id on an unreplicated shard; on a replicated one an id leased from the
        coordinator (its followers keep the record under it: it must be unique in the
        cluster and across restarts)."""
        if not self._replicated():
            self._autocommit_seq += 1
            return AUTOCOMMIT_TXID_BASE + self._autocommit_seq
        if not self._leased_txids:
            if self.coordinator is None:
                raise txrpc.FailedPrecondition(
                    "a transactional call outside a transaction on a replicated shard needs the coordinator "
                    "(for its transaction id)"
                )
            lease = await self.coordinator.call("coord.lease", 64)
            first, count = int(lease["first"]), int(lease["count"])
            self._leased_txids = list(range(first + count - 1, first - 1, -1))
        return self._leased_txids.pop()

    # --- the coordinator's messages ------------------------------------------------------------

    def _internal_service(self) -> txrpc.Service:
        # The coordinator's messages are internal to the cluster: on a server with
        # security, only peers may send them (a client forging tx.commit/tx.abort could
        # decide other callers' transactions). tx.status is read-only: clients ask it
        # for a one-phase outcome (Cluster.outcome).
        #
        # Each bounds its own waits: run without a cancel scope per call (specs/commit-protocol.md,
        # "Handlers without a cancel scope").
        svc = txrpc.Service("tx")
        svc.add_method(self.prepare, name="prepare", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self.commit, name="commit", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self.commit_many, name="commit_many", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self.prepare_many, name="prepare_many", allow=txrpc.ROLE_PEER, bounded=True)
        # A client aborts, or commits in one phase, its own transaction at the shard (the
        # single-shard fast path); anyone else's only a peer may.
        svc.add_method(self._abort_from_caller, name="abort", bounded=True)
        one_phase = svc.add_method(self._commit_one_phase_from_caller, name="commit_one_phase", bounded=True)
        one_phase.try_now = self._commit_one_phase_now  # (its common case: no task)
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

    async def _abort_from_caller(self, txid: int, on_behalf_of: str = "") -> str:
        """``on_behalf_of``: as for ``commit_one_phase`` (the coordinator passes on a
        client's abort of a transaction whose owner it does not know)."""
        self._check_caller_may_decide(txid, "abort")
        self._check_on_behalf_of(txid, on_behalf_of, "abort")
        return await self.abort(txid)

    async def _commit_one_phase_from_caller(self, txid: int, on_behalf_of: str = "") -> dict[str, Any]:
        """``on_behalf_of``: a peer (the coordinator re-driving a one-phase commit whose
        owner it no longer knows) names the client that asked; only the transaction's
        owner may have it committed."""
        self._check_caller_may_decide(txid, "commit")
        self._check_on_behalf_of(txid, on_behalf_of, "commit")
        return await self.commit_one_phase(txid)

    def _check_on_behalf_of(self, txid: int, on_behalf_of: str, what: str) -> None:
        if not on_behalf_of:
            return
        if type(on_behalf_of) is not str:
            raise txrpc.InvalidArgument("on_behalf_of must be an identity (a string)")
        tx = self.core.txs.get(txid)
        if txrpc.current_call().secured and tx is not None and tx.owner and tx.owner != on_behalf_of:
            raise txrpc.PermissionDenied(
                f"{on_behalf_of!r} may not {what} transaction {txid}: it belongs to another caller",
                {"not_started": True},
            )

    async def _serialize(self, txid: int) -> None:
        """Wait while another protocol message of ``txid`` is writing."""
        while (event := self._busy.get(txid)) is not None:
            await event.wait()

    @_not_cancelled_midway
    async def prepare(self, txid: int) -> dict[str, Any]:
        """Phase 1: vote. A yes vote means the prepare record is durable (replicated: on
        every replica of the current epoch)."""
        await self._serialize(txid)
        held = self.core.locks.held_by(txid) if self._replicated() else {}
        tx = self.core.txs.get(txid)
        if (
            tx is not None
            and tx.state is TxState.ACTIVE
            and tx.epoch is not None
            and self.replication is not None
            and tx.epoch != self.replication.guard.epoch
        ):
            # The map changed since its first operation here: this node may have stopped
            # being the primary of what it read and become it again meanwhile (a move out
            # and back), its locks guarding nothing while another primary committed
            # writes to those keys. (Found by the simulator: a move storm, a stale read
            # committed with the fence passing at the new epoch.)
            now_epoch = self.replication.guard.epoch
            reason = f"the shard map changed during the transaction (epoch {tx.epoch} -> {now_epoch})"
            self._wake(self.core.abort(txid, reason), txid)
            return {"vote": "no", "reason": reason}
        action, vote, reason, granted = self.core.prepare(txid)
        assert action is not PrepareAction.WAIT, "prepare writes are serialized per txid"
        if action is PrepareAction.VOTE:
            assert vote is not None
            self._wake(granted, txid if vote is Vote.NO else None)
            if vote is Vote.READ_ONLY and held:
                # Read-only here: nothing to make durable, but a deposed primary's reads
                # must not commit — check the epoch with the followers. (A re-prepare of a
                # transaction already prepared needs no check: its first yes vote was
                # fenced at its epoch, its write locks are held by the replicas, which a
                # new primary inherits. This check ran on that re-prepare instead of on
                # the read-only vote, where stale reads committed.)
                refusal = await self._fence_reads(txid, held)
                if refusal:
                    return {"vote": "no", "reason": refusal}
            return {"vote": vote.value, "reason": reason}
        assert action is PrepareAction.WRITE_RECORD
        writes, locks = self._record_of(txid)
        self._busy[txid] = done = trio.Event()
        try:
            if _env.buggify("participant.slow_prepare"):
                await trio.sleep(self.rng.uniform(0.0, self.phase_timeout_s))
            error, (replicas,) = await self._write_records([(txid, writes, locks)])
            return await self._vote_after_record(txid, error, replicas)
        finally:
            del self._busy[txid]
            done.set()

    async def prepare_many(self, txids: list[int]) -> list[Any]:
        """Phase 1 for several transactions at once (the coordinator batches them): each
        prepared as by :meth:`prepare` -- on an unreplicated shard most of them together,
        their records in one write (:meth:`_take_prepares`), the rest concurrently (their
        records share group commits). Answers, in order, each one's vote (as
        :meth:`prepare`) or its error (a string)."""
        _check_txid_batch(txids)

        voted: dict[int, Any] = {}  # answered by _take_prepares already: no record to write

        async def one(txid: int) -> Any:
            if txid in voted:
                return voted[txid]
            return await self._answer_of(self.prepare, txid, "prepare")

        group = self._take_prepares(txids, voted)
        try:
            return await self._each_answered(txids, one, None if group is None else group[:2])
        except BaseException:
            if group is not None:
                group[2]()  # (a no-op once the write started)
            raise

    def _take_prepares(
        self, txids: list[int], voted: dict[int, Any]
    ) -> tuple[list[int], Callable[[], Awaitable[list[Any]]], Callable[[], None]] | None:
        """The common case of :meth:`prepare_many` on an unreplicated shard, for many
        transactions at once: each one no other message of it is writing is voted on now
        (as :meth:`prepare` does, without an await in between). A vote that needs no
        record (read-only, unknown, no) goes into ``voted``, answered at once; the
        prepare records of the others are made durable together, as one queued write.
        Returns (their indices, the job that writes the records and answers each, and
        what undoes the taking if the job never runs), or None if none; :meth:`prepare`
        takes the rest (a txid another message is writing, one whose map changed since its
        first operation, those past ``GROUP_RECORDS_MAX``). A replicated shard prepares
        each record on its own only when it has nothing to write (a read-only vote
        checks its reads' epoch with the followers first); the others' copies are sent
        to the followers while the records are written here (:meth:`_write_taken_prepares`)."""
        replicated = self._replicated()
        epoch = None if self.replication is None else self.replication.guard.epoch
        indices: list[int] = []
        taken: list[tuple[int, WriteSet, list[tuple[Any, str]]]] = []
        for index, txid in enumerate(txids):
            if len(taken) == GROUP_RECORDS_MAX:
                break
            if txid in self._busy:
                continue
            tx = self.core.txs.get(txid)
            if tx is not None and tx.epoch is not None and epoch is not None and tx.epoch != epoch:
                continue  # prepare votes no on it (the map changed during the transaction)
            if replicated and tx is not None and tx.state is TxState.ACTIVE and not tx.writes:
                continue  # read-only: prepare fences its reads
            action = None
            try:
                action, vote, reason, granted = self.core.prepare(txid)
                if action is PrepareAction.VOTE:
                    assert vote is not None
                    self._wake(granted, txid if vote is Vote.NO else None)
                    voted[txid] = {"vote": vote.value, "reason": reason}
                elif action is PrepareAction.WRITE_RECORD:
                    taken.append((txid, *self._record_of(txid)))
                    indices.append(index)
                # (WAIT is not reached: a preparing transaction is busy)
            except Exception as exc:  # one failing transaction must not fail the others' answers
                log.error("node %s: prepare of %s failed", self.shard, txid, exc_info=exc)
                if action is PrepareAction.WRITE_RECORD:
                    self._wake(self.core.prepare_failed(txid, f"prepare failed: {exc}"), txid)
                voted[txid] = f"INTERNAL: {type(exc).__name__}: {exc}"
        if not taken:
            return None

        def abort(txid: int) -> None:
            # Nothing of it is on disk: it aborts, as after a failed write (the
            # coordinator, which got no answer, aborts it too).
            self._wake(self.core.prepare_failed(txid, "the prepare batch failed before its write"), txid)

        async def write() -> list[Any]:
            with trio.CancelScope(shield=True):  # as each prepare is: memory must end up saying what disk says
                votes = await self._write_taken_prepares(taken)
            return votes

        def never_ran() -> str:
            return "UNAVAILABLE: the prepare batch failed before its write"

        job, untake = self._batch_job([txid for txid, _, _ in taken], abort, write, never_ran)
        return indices, job, untake

    def _batch_job(
        self,
        ids: list[int],
        undo: Callable[[int], None],
        work: Callable[[], Awaitable[list[Any]]],
        never_ran: Callable[[], Any],
    ) -> tuple[Callable[[], Awaitable[list[Any]]], Callable[[], None]]:
        """The job and the undo of records taken together (:meth:`_take_prepares`,
        :meth:`_repl_take_prepares`): each id is busy (other messages of it wait) until
        ``work`` (their write and answers) ends. If the batch fails before the job starts,
        the undo (a no-op once it started) ``undo``es each id and frees it, and the job,
        should it still run, answers ``never_ran()`` for each without working."""
        done = trio.Event()
        for record_id_ in ids:
            self._busy[record_id_] = done
        state = ["taken"]  # -> "writing" (the job started) or "untaken" (it never will)

        def release() -> None:
            for record_id_ in ids:
                del self._busy[record_id_]
            done.set()

        def untake() -> None:
            if state[0] != "taken":
                return
            state[0] = "untaken"
            for record_id_ in ids:
                undo(record_id_)
            release()

        async def job() -> list[Any]:
            if state[0] == "untaken":
                return [never_ran() for _ in ids]
            state[0] = "writing"
            try:
                return await work()
            finally:
                release()

        return job, untake

    def _record_of(self, txid: int) -> tuple[WriteSet, list[tuple[Any, str]]]:
        """A transaction's prepare record: its write set and the locks it holds."""
        writes = [(k, v is TOMBSTONE, None if v is TOMBSTONE else v) for k, v in self.core.txs[txid].writes.items()]
        return writes, [(resource, mode.value) for resource, mode in self.core.locks.held_by(txid).items()]

    async def _write_taken_prepares(self, taken: list[tuple[int, WriteSet, list[tuple[Any, str]]]]) -> list[Any]:
        """The job of :meth:`_take_prepares`: the records in one write, then each
        transaction's vote as :meth:`prepare` gives it (or its error, as a string)."""
        if _env.buggify("participant.slow_prepare"):
            await trio.sleep(self.rng.uniform(0.0, self.phase_timeout_s))
        error, replicas = await self._write_records(taken)
        votes: list[Any] = [None] * len(taken)

        async def vote(index: int) -> None:
            txid, replicated = taken[index][0], replicas[index]
            try:
                votes[index] = await self._vote_after_record(txid, error, replicated)
            except StorageClosed:
                votes[index] = "UNAVAILABLE: the shard is stopping"  # (as prepare answers it)
            except txrpc.RpcError as exc:
                votes[index] = f"{exc.code.name}: {exc.message}"
            except Exception as exc:
                log.error("node %s: prepare of %s failed", self.shard, txid, exc_info=exc)
                votes[index] = f"INTERNAL: {type(exc).__name__}: {exc}"

        if error is None and not any(isinstance(r, str) or (isinstance(r, Plan) and r.failures) for r in replicas):
            for index in range(len(taken)):  # every record is where it must be: no vote waits (no task)
                await vote(index)
        else:
            # A no vote drops its record and tells the followers that took a copy: those
            # clean-ups run concurrently, as separate prepares did (one after another, a
            # batch of refusals held the later ones' locks for a round trip each).
            async with trio.open_nursery() as nursery:
                for index in range(len(taken)):
                    nursery.start_soon(vote, index)
        return votes

    async def _write_records(
        self, taken: list[tuple[int, WriteSet, list[tuple[Any, str]]]]
    ) -> tuple[Exception | None, list[Plan | str | None]]:
        """Make the prepare records of ``taken`` durable here (one queued write) and, on a
        replicated shard, send the followers their copies meanwhile: the votes wait for
        both (one durable write's latency, not two in a row). Returns the local write's
        error (None: durable) and, per record, its replicas (the plan, whose ``failures``
        name the followers that did not take it; or why it was not sent; None
        unreplicated). Raises nothing else."""
        error: Exception | None = None
        records = [(txid, writes, locks, None) for txid, writes, locks in taken]
        replicas: list[Plan | str | None] = [None] * len(taken)
        if self._replicated():
            # Queued first and waited for last: the local write needs no task of its own.
            written = trio.Event()

            def done(_: Any, exc: BaseException | None) -> None:
                nonlocal error
                if exc is not None:
                    error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                written.set()

            try:
                self.store.write_prepares_nowait(records, done)
            except Exception as exc:
                done(None, exc)
            try:
                replicas = list(await self._send_taken_replicas(taken))
            except Exception as exc:  # (the votes must still come: each no)
                log.exception("shard %s: replicated prepares of %d txs failed", self.shard, len(taken))
                replicas = [f"prepare records not replicated: {type(exc).__name__}: {exc}"] * len(taken)
            await written.wait()
        else:
            try:
                await self.store.write_prepares(records)
            except Exception as exc:
                error = exc
        if error is not None:
            (log.info if stopping(error) else log.error)(
                "shard %s: prepare records of %d txs not written: %s", self.shard, len(taken), error
            )
        return error, replicas

    async def _record_not_written(self, txid: int, error: Exception) -> str:
        """``txid``'s prepare record could not be made durable: it votes no (the reason,
        returned) and aborts here, its locks freed. If the write's outcome is unknown (it
        failed during COMMIT) the record may be on disk: it is dropped first
        (:meth:`_drop_record_or_stay_prepared`)."""
        reason = f"prepare record not durable: {error}"
        if isinstance(error, BatchFailed) and error.outcome_unknown:
            if not await self._drop_record_or_stay_prepared(txid, " may be on disk,"):
                return reason
        self._wake(self.core.prepare_failed(txid, reason), txid)
        return reason

    async def _drop_record_or_stay_prepared(self, txid: int, what: str) -> bool:
        """Drop ``txid``'s prepare record before its locks are freed (a record left on disk
        with its locks freed could let a conflicting transaction prepare, and a restart
        would find both). False if the drop failed: the record may stay, so the
        transaction stays prepared (locks held) until the coordinator's abort, or asking
        it (presumed abort), ends it."""
        try:
            await self.store.delete_prepare(txid)
        except Exception as exc:
            log.warning("shard %s: prepare record of %d%s not dropped: %s", self.shard, txid, what, exc)
            if self.core.prepared(txid):
                self.core.locks.mark_prepared(txid)
                self._prepared_at[txid] = trio.current_time()
            return False
        return True

    async def _vote_after_record(
        self, txid: int, error: Exception | None, replicas: Plan | str | None = None
    ) -> dict[str, Any]:
        """A transaction's vote once its prepare record's write ended (``error``: it
        failed) and, replicated, its followers answered (``replicas``: the plan with
        those that did not take it, or why it was not sent)."""
        if error is not None:
            reason = await self._record_not_written(txid, error)
            await self._abort_replicas(txid, replicas)
            return {"vote": "no", "reason": reason}
        refusal = replicas if isinstance(replicas, str) else ""
        if isinstance(replicas, Plan) and replicas.failures:
            refusal = "prepare record not on every replica: " + _describe_failures(replicas.failures)
        if refusal:
            # Decided before the transaction counts as prepared: a no voter aborts
            # on its own, not on the coordinator's abort (a coordinator crash loses
            # that; found by the simulator). The record goes before the locks: freed
            # locks with the record still on disk could let a conflicting transaction
            # prepare, and both would come back at a restart.
            log.info("shard %s: votes no on %d: %s", self.shard, txid, refusal)
            if not await self._drop_record_or_stay_prepared(txid, ""):
                await self._abort_replicas(txid, replicas)
                return {"vote": "no", "reason": refusal}
            await self._abort_replicas(txid, replicas)
            self._wake(self.core.prepare_failed(txid, refusal), txid)
            return {"vote": "no", "reason": refusal}
        if not self.core.prepared(txid):  # aborted while the record was being written
            await self.store.delete_prepare(txid)
            await self._abort_replicas(txid, replicas)
            return {"vote": "no", "reason": "aborted during prepare"}
        self.core.locks.mark_prepared(txid)
        self._prepared_at[txid] = trio.current_time()
        if isinstance(replicas, Plan):  # (a yes vote: every follower took its share)
            self._holders[txid] = sorted(f for f, share in replicas.by_follower.items() if share)
        if _env.broken("participant.release_locks_at_prepare"):
            # Test-only broken protocol (simulator): others may read and overwrite
            # what this transaction is about to commit.
            self._wake(self.core.locks.release_all(txid))
        crash_point("participant.after_prepare")
        return {"vote": "yes", "reason": ""}

    async def _answer_of(self, step: Callable[[Any], Awaitable[Any]], txid: Any, what: str) -> Any:
        """``await step(txid)`` (a txid, or a list of them), or its error as a string
        (``"CODE: message"``): in a batch one failing transaction must not fail the others'
        answers."""
        try:
            return await step(txid)
        except txrpc.RpcError as exc:
            return f"{exc.code.name}: {exc.message}"
        except Exception as exc:
            if stopping(exc):
                log.info("node %s: %s of %s not done: the node is stopping (%s)", self.shard, what, txid, exc)
                return "UNAVAILABLE: the shard is stopping"
            log.error("node %s: %s of %s failed", self.shard, what, txid, exc_info=exc)
            return f"INTERNAL: {type(exc).__name__}: {exc}"

    async def _each_answered(
        self,
        items: list[Any],
        one: Callable[[Any], Awaitable[Any]],
        group: tuple[list[int], Callable[[], Awaitable[list[Any]]]] | None = None,
    ) -> list[Any]:
        """``[await one(item) for item in items]``, run concurrently (their writes share
        group commits). ``one`` must not raise. With ``group`` (indices, job), the items
        at those indices are answered together by ``await job()`` (their answers, in
        order; it must not raise either) instead of by ``one``.

        A batch is answered by a cut-off (``BATCH_ANSWER_S``, or half the call's
        remaining time): a step still running then is answered ``PENDING`` and finishes
        in the background, so one slow step (a follower's lock wait, a slow replica)
        does not hold back the others' answers (the sender asks again for it alone,
        which waits for the step). A lone step runs inline, without the cut-off (a
        replicated prepare group is answered when its followers have answered, within
        their ``timeout_s``: a task and a cut-off per batch cost ~4 % of the simulator's
        instructions per transfer at R = 3, and the coordinator holds back every vote of
        a batch until its resends are answered anyway)."""
        answers: list[Any] = [PENDING] * len(items)
        grouped = set(group[0]) if group is not None else set()
        singles = [index for index in range(len(items)) if index not in grouped]
        left = [len(singles) + (group is not None)]
        finished = trio.Event()

        async def run(index: int, item: Any) -> None:
            try:
                answers[index] = await one(item)
            finally:
                left[0] -= 1
                if left[0] == 0:
                    finished.set()

        async def run_group(indices: list[int], job: Callable[[], Awaitable[list[Any]]]) -> None:
            try:
                for index, answer in zip(indices, await job(), strict=True):
                    answers[index] = answer
            finally:
                left[0] -= 1
                if left[0] == 0:
                    finished.set()

        if left[0] == 1:  # one step: no task of its own
            if group is not None:
                await run_group(*group)
            else:
                await run(0, items[0])
            return answers
        background = self._background
        if background is None or background.cancel_scope.cancel_called:
            async with trio.open_nursery() as nursery:
                if group is not None:
                    nursery.start_soon(run_group, *group)
                for index in singles:
                    nursery.start_soon(run, index, items[index])
            return answers
        if group is not None:
            background.start_soon(run_group, *group)
        for index in singles:
            background.start_soon(run, index, items[index])
        now = trio.current_time()
        serving = _current_call_or_none()
        deadline = min(trio.current_effective_deadline(), math.inf if serving is None else serving.deadline)
        cut_off = now + min(BATCH_ANSWER_S, max(0.0, (deadline - now) / 2))
        with trio.move_on_at(cut_off):
            await finished.wait()
        return list(answers)

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
        followers = self._followers_to_tell(txid)
        await self._apply(txid)
        if followers:
            await self.replication.send_outcome_soon(txid_of(txid), followers, "commit")  # type: ignore[union-attr]
        if _env.buggify("participant.slow_commit_ack"):
            await trio.sleep(self.rng.uniform(0.0, self.phase_timeout_s))
        return "ok"

    async def commit_many(self, txids: list[int]) -> list[str]:
        """Phase 2 for several transactions at once (the coordinator batches them): each
        committed as by :meth:`commit`, concurrently (their writes share group commits).
        Answers, in order, ``"ok"`` or the error of that transaction's commit."""
        _check_txid_batch(txids)
        answers = [""] * len(txids)
        # The common case, for many at once: prepared here and no other message of theirs
        # writing: applied together (one queued write). The rest each as by commit.
        ready: list[int] = []
        rest: list[int] = []
        for index, txid in enumerate(txids):
            tx = self.core.txs.get(txid)
            if tx is None or tx.state is not TxState.PREPARED or txid in self._busy:
                rest.append(index)
            elif len(ready) < GROUP_RECORDS_MAX:
                ready.append(index)
            else:
                rest.append(index)

        async def one(index: int, txid: int) -> None:
            answers[index] = await self._answer_of(self.commit, txid, "commit")

        async def together() -> None:
            answer = await self._answer_of(self._commit_together, [txids[i] for i in ready], "commit")
            for index in ready:
                answers[index] = answer

        if not rest:  # the common case: no task, no nursery
            await together()
            return answers
        async with trio.open_nursery() as nursery:
            for index in rest:
                nursery.start_soon(one, index, txids[index])
            if ready:
                await together()
        return answers

    @_not_cancelled_midway
    async def _commit_together(self, txids: list[int]) -> str:
        """:meth:`commit` for several transactions prepared here that no other message of
        theirs is writing (each would be applied): their writes go as one queued write."""
        crash_point("participant.before_commit_apply")
        followers = [(txid, self._followers_to_tell(txid)) for txid in txids]
        await self._apply_many(txids)
        for txid, tell in followers:
            if tell:
                await self.replication.send_outcome_soon(txid_of(txid), tell, "commit")  # type: ignore[union-attr]
        if _env.buggify("participant.slow_commit_ack"):
            await trio.sleep(self.rng.uniform(0.0, self.phase_timeout_s))
        return "ok"

    async def _apply(self, txid: int) -> None:
        await self._apply_many([txid])

    async def _apply_many(self, txids: list[int]) -> None:
        """Commit transactions held here that no other message of theirs is writing:
        their write sets (data, commit-log entries, prepare records dropped) go to the
        store as one queued write; then their locks are released."""
        commits = [(txid, _write_set(self.core.txs[txid])) for txid in txids]
        done = trio.Event()
        for txid in txids:
            self._busy[txid] = done
        try:
            if self.replication is not None and self.replication.resyncing:
                # Before the write is queued, not after it is durable: a catch-up page
                # filtered in between would otherwise be queued behind this newer write
                # and overwrite it with the older snapshot value.
                self.replication.touched.update(k for _, writes in commits for k, _, _ in writes)
            durable = [commit for commit in commits if commit[1]]  # read-only: nothing to write
            if durable:
                await self.store.apply_commits(durable)
            for txid in txids:
                self._replicated_epoch.pop(txid, None)
                self._prepared_at.pop(txid, None)
                self._holders.pop(txid, None)
                self._wake(self.core.committed(txid))
        finally:
            for txid in txids:
                del self._busy[txid]
            done.set()

    @_not_cancelled_midway
    async def abort(self, txid: int) -> str:
        """Phase 2 abort (idempotent)."""
        await self._serialize(txid)
        tx = self.core.txs.get(txid)
        followers: list[str] = []
        if tx is not None and tx.state is TxState.PREPARED:
            followers = self._followers_to_tell(txid)
            await self.store.delete_prepare(txid)
        self._prepared_at.pop(txid, None)
        self._replicated_epoch.pop(txid, None)
        self._holders.pop(txid, None)
        self._wake(self.core.abort(txid, "aborted by the coordinator"), txid)
        if followers:
            await self.replication.send_outcome(txid_of(txid), followers, "abort")  # type: ignore[union-attr]
        return "ok"

    @_not_cancelled_midway
    async def commit_one_phase(self, txid: int) -> dict[str, Any]:
        """The only participant: commit locally at once (idempotent)."""
        await self._serialize(txid)
        if self._replicated():
            # The copies on the followers must outlive this primary, so the decision must
            # too: a replicated shard's single-shard transactions are decided (durably)
            # by the coordinator, in two phases. Nothing is changed here.
            raise txrpc.FailedPrecondition(
                f"shard {self.shard} is replicated: commit transaction {txid} through the coordinator",
                {"not_started": True, "replicated": True},
            )
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

    def _commit_one_phase_now(self, args: Any, kwargs: dict[str, Any]) -> Any:
        """``MethodSpec.try_now`` of ``tx.commit_one_phase``: on an unreplicated shard, a
        transaction ready to commit whose commit nothing else is writing is applied as
        :meth:`commit_one_phase` does, but its durable write is queued without a task
        and the answer comes from the write's callback (:class:`txrpc.Later`); anything
        else (a wait, a refusal, a lookup in the commit log) is ``NOT_NOW``."""
        txid, on_behalf_of = _one_phase_arguments(*args, **kwargs)
        self._check_caller_may_decide(txid, "commit")
        self._check_on_behalf_of(txid, on_behalf_of, "commit")
        if self._replicated() or txid in self._busy:
            return NOT_NOW
        if self.replication is not None and self.replication.resyncing:
            return NOT_NOW  # (_apply_many records the keys a catch-up must not overwrite)
        ok, reason = self.core.one_phase_ready(txid)
        if not ok:
            return NOT_NOW  # (it aborts there, after a look in the commit log)
        if reason == "already committed":
            return {"outcome": "committed", "reason": reason}
        tx = self.core.txs[txid]
        self.core.locks.mark_prepared(txid)
        tx.state = TxState.PREPARED
        writes = _write_set(tx)
        if not writes:  # read-only: nothing to write
            self._replicated_epoch.pop(txid, None)  # (as _apply_many)
            self._prepared_at.pop(txid, None)
            self._holders.pop(txid, None)
            self._wake(self.core.committed(txid))
            return {"outcome": "committed", "reason": ""}
        later = txrpc.Later()
        done = trio.Event()
        self._busy[txid] = done

        def durable(_: Any, exc: BaseException | None) -> None:
            answer: dict[str, Any] | None = None
            try:
                if exc is None:
                    self._replicated_epoch.pop(txid, None)  # (as _apply_many)
                    self._prepared_at.pop(txid, None)
                    self._holders.pop(txid, None)
                    self._wake(self.core.committed(txid))
                    answer = {"outcome": "committed", "reason": ""}
                else:
                    self._wake(self.core.abort(txid, f"commit not durable: {exc}"), txid)
                    answer = {"outcome": "aborted", "reason": f"commit not durable: {exc}"}
            except Exception as failure:  # (the call must be answered all the same)
                later.fail(failure)
                return
            finally:
                del self._busy[txid]
                done.set()
            later.resolve(answer)

        try:
            self.store.apply_commits_nowait([(txid, writes)], durable)
        except Exception as exc:
            durable(None, exc)
        return later

    # --- replication (primary side) ---------------------------------------------------------------

    def _followers_to_tell(self, txid: int) -> list[str]:
        """The followers a primary tells the outcome of ``txid`` (none on a follower):
        those that took its prepare record -- whatever the map says now (after a
        switchover or a move this node may no longer be their primary, but they hold the
        record and its locks until they hear) -- or, for a record recovered from disk or
        inherited, the followers of its keys at the current epoch."""
        holders = self._holders.get(txid)
        if holders is not None:
            return holders
        if not self._replicated():
            return []
        assert self.replication is not None
        tx = self.core.txs.get(txid)
        if tx is None or not tx.writes or not self.replication.owns(tx.writes):
            return []
        return self.replication.followers_of_tx(_write_set(tx))

    def _replica_request(
        self, txid: int, writes: WriteSet, locks: list[tuple[Any, str]]
    ) -> tuple[int, WriteSet, list[str], bool] | str:
        """What :meth:`Replication.send_prepares` takes for this record, or why it may
        not be sent (this node is no longer the primary of its keys)."""
        assert self.replication is not None
        keys = [k for k, _, _ in writes] + [r for r, _ in locks if isinstance(r, str)]
        if not self.replication.owns(keys):
            return f"node {self.shard} is no longer the primary of these keys at epoch {self.replication.guard.epoch}"
        read_keys = [r for r, mode in locks if isinstance(r, str) and mode == Mode.S.value]
        scanned = any(r == SCAN_RESOURCE and mode == Mode.S.value for r, mode in locks)
        return (txid, writes, read_keys, scanned)

    async def _send_taken_replicas(self, taken: list[tuple[int, WriteSet, list[tuple[Any, str]]]]) -> list[Plan | str]:
        """Send the prepare records of a batch to the followers, with one wait for all
        their acknowledgements: per record, the plan (with ``failures``, the followers that
        did not take it), or why it was not sent (deposed: :meth:`_replica_request`)."""
        assert self.replication is not None
        out: list[Plan | str] = []
        requests = []
        for txid, writes, locks in taken:
            request = self._replica_request(txid, writes, locks)
            out.append(request if isinstance(request, str) else "")
            if not isinstance(request, str):
                requests.append(request)
        plans = iter(await self.replication.send_prepares(requests))
        return [answer if answer else next(plans) for answer in out]

    async def _abort_replicas(self, txid: int, replicas: Plan | str | None) -> None:
        """Tell the followers that took ``txid``'s record that it will not commit."""
        if isinstance(replicas, Plan) and self.replication is not None:
            took = [f for f in replicas.by_follower if f not in replicas.failures]
            if took:
                await self.replication.send_outcome(txid, took, "abort")

    async def _fence_reads(self, txid: int, held: dict[Any, Mode]) -> str:
        assert self.replication is not None
        read_keys = [r for r in held if isinstance(r, str)]
        if not self.replication.owns(read_keys):
            epoch = self.replication.guard.epoch
            return f"node {self.shard} is no longer the primary of the keys it read (epoch {epoch})"
        # A scan holds no key locks (the shard-wide scan lock): every follower of this
        # node's partitions confirms the epoch then.
        scanned = held.get(SCAN_RESOURCE) is Mode.S
        fenced = await self.replication.send_prepare(txid, [], read_keys, scanned=scanned)
        if fenced.failures:
            return "epoch not confirmed by every replica: " + _describe_failures(fenced.failures)
        return ""

    # --- replication (follower side) ---------------------------------------------------------

    def _replication_service(self) -> txrpc.Service:
        svc = txrpc.Service("repl")
        # The record messages bound their own waits: no cancel scope per call (specs/commit-protocol.md,
        # "Handlers without a cancel scope").
        svc.add_method(self._repl_prepare, name="prepare", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self._repl_prepare_many, name="prepare_many", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self._repl_commit, name="commit", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self._repl_commit_many, name="commit_many", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self._repl_abort, name="abort", allow=txrpc.ROLE_PEER, bounded=True)
        svc.add_method(self._repl_install_map, name="install_map", allow=txrpc.ROLE_PEER)
        svc.add_method(self._repl_snapshot, name="snapshot", allow=txrpc.ROLE_PEER)
        svc.add_method(self._repl_catch_up, name="catch_up", allow=txrpc.ROLE_PEER)
        svc.add_method(self._repl_drop_partitions, name="drop_partitions", allow=txrpc.ROLE_PEER)
        svc.add_method(self._repl_digests, name="digests")
        svc.add_method(self._repl_ping, name="ping")
        return svc

    async def _repl_prepare(self, txid: int, writes: list[Any], origin: str = "") -> str:
        """A primary's prepare record for the keys this node follows: durable, its write
        locks held, before the answer. Kept under ``-txid`` (this node may also be a
        participant of the same transaction for keys it is primary of)."""
        assert self.replication is not None
        share = _repl_share(txid, writes, origin)
        keys = [k for k, _, _ in share]
        await self.replication.fence(origin, keys)
        self.replication.stats["prepares_received"] += 1
        if not share:
            return "ok"  # reads only: the epoch check was the point
        rid = record_id(txid, self.replication.origin_index(origin))
        fenced = rid not in self._busy  # no wait in _serialize: the fence above still holds
        await self._serialize(rid)
        tx = self.core.txs.get(rid)
        if tx is not None:
            return "ok"  # a resend
        if self.core.finished.get(rid) is not None:
            raise txrpc.FailedPrecondition(
                f"transaction {txid} was already {self.core.finished[rid].value} on follower {self.shard}"
            )
        locks = [(k, Mode.X) for k, _, _ in share]
        # The primary stops waiting for the answer at the call's deadline: a record taken
        # after it would be one the primary does not know it holds here (it tells only the
        # followers that acknowledged); refused instead (the call has no scope of its own).
        serving = _current_call_or_none()
        deadline = math.inf if serving is None else serving.deadline
        while True:
            if self.replication.conflicts(rid, locks):
                await self.replication.wait_for_locks(rid, locks, until=deadline)  # (bounded)
                fenced = False
                continue
            if not fenced:
                await self.replication.fence(origin, keys)  # the epoch may have moved while it waited
                fenced = True
                continue  # taken while the map was fetched? check again
            if rid in self.core.txs:
                return "ok"  # a resend that overtook this one
            if trio.current_time() >= deadline:
                raise txrpc.Unavailable(
                    f"follower {self.shard}: transaction {txid}'s record came after its sender's deadline",
                    {"not_started": True},
                )
            # The locks are taken before the durable write (no await in between since the
            # check), so nothing can take them while the record is being written.
            self._take_replicated(rid, share, locks, txrpc.current_call().metadata["epoch"], trio.current_time())
            break
        meta = {"origin": origin, "epoch": self._replicated_epoch[rid]}
        self._busy[rid] = done = trio.Event()
        try:
            try:
                # Shielded: a record the primary gave up on (its timeout, a dropped
                # connection) may still become durable; memory must say what disk says,
                # or a restart finds a record nothing holds the locks of.
                with trio.CancelScope(shield=True):
                    await self.store.write_prepare(rid, share, [(k, m.value) for k, m in locks], meta)
            except BaseException as exc:
                # An unknown outcome may be on disk: kept, resolved like any record.
                if not (isinstance(exc, BatchFailed) and exc.outcome_unknown):
                    self._drop_replicated(rid, "replicated prepare record not durable")
                raise
        finally:
            del self._busy[rid]
            done.set()
        return "ok"

    def _take_replicated(
        self, rid: int, share: WriteSet, locks: list[tuple[Any, Mode]], epoch: int, now: float
    ) -> None:
        """A replicated record held here from now on: prepared, its write locks taken. It
        keeps the epoch it was taken at from now (not once durable): a catch-up that starts
        while it is being written must see a record of the join epoch, not a stale one to
        drop (found by test_replication_processes: it was dropped)."""
        self.core.restore_prepared(rid, {k: (TOMBSTONE if d else v) for k, d, v in share}, locks, now)
        self.core.locks.mark_prepared(rid)
        self._replicated_epoch[rid] = epoch
        self._prepared_at[rid] = now

    def _drop_replicated(self, rid: int, reason: str) -> None:
        """Undo :meth:`_take_replicated` (its record is not on disk): aborted, locks freed."""
        self._replicated_epoch.pop(rid, None)
        self._prepared_at.pop(rid, None)
        self._wake(self.core.abort(rid, reason), rid)

    async def _repl_prepare_many(
        self, records: list[Any], origin: str = "", commits: list[int] | None = None
    ) -> list[Any]:
        """Several of a primary's prepare records at once (it batches them per follower):
        each taken as by :meth:`_repl_prepare`, concurrently (their writes share group
        commits). Answers, in order, ``"ok"`` or that record's error as ``[code, message,
        details]`` (a fenced record's ``WRONG_EPOCH`` carries this node's map).

        ``commits``: commit notices riding along (what a ``repl.commit_many`` carries),
        applied in the background: the answer does not wait for them. A record here that
        conflicts with one of them waits for it, as any conflicting record does."""
        if (
            not isinstance(records, list)
            or not 0 < len(records) <= COMMIT_MANY_MAX
            or not all(isinstance(r, list) and len(r) == 2 and isinstance(r[1], list) for r in records)
        ):
            raise txrpc.InvalidArgument(f"records must be 1..{COMMIT_MANY_MAX} [txid, writes] pairs")
        if commits is not None:
            _check_notices(commits)
            if commits:
                background = self._background
                if background is None or background.cancel_scope.cancel_called:
                    await self._repl_commit_many(commits)
                else:
                    background.start_soon(self._apply_riding_notices, commits)

        async def one(record: list[Any]) -> Any:
            txid, writes = record
            try:
                return await self._repl_prepare(txid, writes, origin)
            except txrpc.RpcError as exc:
                return [int(exc.code), exc.message, dict(exc.details)]
            except Exception as exc:  # one failing record must not fail the others' answers
                if stopping(exc):
                    return _stopping()  # (expected, not an error to log)
                log.error("node %s: replicated prepare of %r failed", self.shard, txid, exc_info=exc)
                return [int(txrpc.Code.INTERNAL), f"{type(exc).__name__}: {exc}", {}]

        group = self._repl_take_prepares(records, origin)
        try:
            answers = await self._each_answered(records, one, None if group is None else group[:2])
        except BaseException:
            if group is not None:
                group[2]()  # (a no-op once the write started)
            raise
        # A fenced record's WRONG_EPOCH carries this node's map; the primary needs it once,
        # not once per record (a batch of 256 fenced records would repeat it 256 times).
        wrong_epoch = int(txrpc.Code.WRONG_EPOCH)
        fenced = [a for a in answers if isinstance(a, list) and a[0] == wrong_epoch and "shard_map" in a[2]]
        for answer in fenced[1:]:
            answer[2] = {k: v for k, v in answer[2].items() if k != "shard_map"}
        return answers

    def _repl_take_prepares(
        self, records: list[Any], origin: str
    ) -> tuple[list[int], Callable[[], Awaitable[list[Any]]], Callable[[], None]] | None:
        """The common case of :meth:`_repl_prepare_many`, for many records at once: each
        record that passes the checks, is new here and conflicts with no lock held has
        its locks taken now (in the batch's order, without an await in between) and is
        made durable with the others in one queued write. Returns (their indices, the job
        that writes them and answers each, and what undoes the taking if the job never
        runs), or None if none; :meth:`_repl_prepare` takes every other record (a
        refusal, a resend, a lock wait, a newer epoch) on its own."""
        replication = self.replication
        assert replication is not None
        call_epoch = txrpc.current_call().metadata.get(EPOCH_METADATA_KEY)
        if type(call_epoch) is not int or call_epoch > replication.guard.epoch:
            return None  # refused, or a newer map to fetch first: each record's own path (concurrently)
        now = trio.current_time()
        indices: list[int] = []
        taken: list[tuple[int, WriteSet, list[tuple[Any, Mode]]]] = []
        for index, (txid, writes) in enumerate(records):
            if len(taken) == GROUP_RECORDS_MAX:
                break
            try:
                share = _repl_share(txid, writes, origin)
                replication.check_fence(origin, call_epoch, [k for k, _, _ in share], count=False)
                if not share:
                    continue
                rid = record_id(txid, replication.origin_index(origin))
            except txrpc.RpcError:
                continue  # answered by the one-record path, with the same error
            locks = [(k, Mode.X) for k, _, _ in share]
            if rid in self._busy or rid in self.core.txs or rid in self.core.finished:
                continue
            if replication.conflicts(rid, locks):
                continue
            replication.stats["prepares_received"] += 1
            self._take_replicated(rid, share, locks, call_epoch, now)
            indices.append(index)
            taken.append((rid, share, locks))
        if not taken:
            return None

        def drop(rid: int) -> None:
            # Nothing of it is on disk: dropped from memory.
            self._drop_replicated(rid, "replicated prepare record never written")

        async def write() -> list[Any]:
            meta = {"origin": origin, "epoch": call_epoch}
            try:
                # Shielded, as in _repl_prepare: memory must say what disk says.
                with trio.CancelScope(shield=True):
                    await self.store.write_prepares(
                        [(rid, share, [(k, m.value) for k, m in locks], meta) for rid, share, locks in taken]
                    )
            except Exception as exc:
                # An unknown outcome may be on disk: kept, resolved like any record.
                if not (isinstance(exc, BatchFailed) and exc.outcome_unknown):
                    for rid, _, _ in taken:
                        self._drop_replicated(rid, "replicated prepare record not durable")
                if isinstance(exc, txrpc.RpcError):
                    return [[int(exc.code), exc.message, dict(exc.details)] for _ in taken]
                if stopping(exc):
                    return [_stopping() for _ in taken]
                log.error("node %s: replicated prepare of %d records failed", self.shard, len(taken), exc_info=exc)
                return [[int(txrpc.Code.INTERNAL), f"{type(exc).__name__}: {exc}", {}] for _ in taken]
            return ["ok"] * len(taken)

        def never_ran() -> list[Any]:
            return [int(txrpc.Code.UNAVAILABLE), "the batch failed before its write", {}]

        job, untake = self._batch_job([rid for rid, _, _ in taken], drop, write, never_ran)
        return indices, job, untake

    async def _repl_commit(self, txid: int) -> str:
        """A primary committed ``txid``: apply its replicated records here (idempotent;
        the decision is the transaction's, so records from every primary of it go)."""
        assert self.replication is not None
        if type(txid) is not int or txid <= 0:
            raise txrpc.InvalidArgument("txid must be a positive integer")
        applied = False
        for rid in self.replication.records_of(txid):
            await self._serialize(rid)
            if rid in self.core.txs:
                if _env.broken("replication.follower_skips_commit"):
                    # Test-only broken protocol (simulator): the follower acknowledges the
                    # commit but drops the record: its copy silently falls behind.
                    await self.abort(rid)
                    return "ok"
                with trio.CancelScope(shield=True):  # durable and in memory together
                    await self._apply(rid)
                applied = True
        return "ok" if applied else "unknown"

    async def _apply_riding_notices(self, txids: list[int]) -> None:
        """The commit notices that rode on a ``repl.prepare_many``, applied after its
        answer (a failure is logged: the records stay prepared and are resolved by the
        termination protocol, as after a lost ``repl.commit_many``)."""
        try:
            await self._repl_commit_many(txids)
        except Exception as exc:
            if stopping(exc):
                log.info("node %s: %d riding commit notices not applied: the node is stopping", self.shard, len(txids))
            else:
                log.exception("node %s: %d commit notices riding on prepare records failed", self.shard, len(txids))

    async def _repl_commit_many(self, txids: list[int]) -> int:
        """Coalesced commit notices (:meth:`_repl_commit` each, at once: their writes
        share the group commit). They never conflict with each other: a record that
        conflicts with another waits here until that one is applied, so both cannot be
        pending together. Returns how many notices (transactions) applied something."""
        _check_notices(txids)
        assert self.replication is not None
        applied = [0]
        # The common case, for many at once: records held here that no other message of
        # theirs is writing are applied together (one queued write); the rest (being
        # written, duplicates) each as by _repl_commit. A transaction with no record here
        # applies nothing, as _repl_commit would find, so it costs no task: a transaction
        # with two primaries reaches a node that follows both with two notices, and the
        # first applies both records (under `txrpc bench tx` at R = 3, one notice in four).
        ready: list[int] = []
        rest: list[int] = []
        if _env.broken("replication.follower_skips_commit"):
            rest = list(txids)
        else:
            seen: set[int] = set()
            for txid in txids:
                rids = self.replication.records_of(txid)
                if not rids:
                    continue
                busy = any(rid in self._busy for rid in rids)
                if txid in seen or busy or len(ready) >= GROUP_RECORDS_MAX:
                    rest.append(txid)
                else:
                    ready += rids
                    applied[0] += 1
                seen.add(txid)

        async def one(txid: int) -> None:
            if await self._repl_commit(txid) == "ok":
                applied[0] += 1

        async def together() -> None:
            with trio.CancelScope(shield=True):  # durable and in memory together
                await self._apply_many(ready)

        if not rest:  # the common case: no task, no nursery
            if ready:
                await together()
            return applied[0]
        async with trio.open_nursery() as nursery:
            for txid in rest:
                nursery.start_soon(one, txid)
            if ready:
                await together()
        return applied[0]

    async def _repl_abort(self, txid: int) -> str:
        if type(txid) is not int or txid <= 0:
            raise txrpc.InvalidArgument("txid must be a positive integer")
        assert self.replication is not None
        for rid in self.replication.records_of(txid):
            await self._serialize(rid)
            if rid in self.core.txs:
                await self.abort(rid)
        return "ok"

    async def _repl_install_map(self, shard_map: Any) -> dict[str, Any]:
        """The authority publishes a new shard map (epochs only move forward)."""
        assert self.replication is not None
        try:
            new_map = ShardMap.from_wire(shard_map)
        except ValueError as exc:
            raise txrpc.InvalidArgument(f"not a shard map: {exc}") from None
        adopted = self.replication.install(new_map)
        return {"epoch": self.replication.guard.epoch, "adopted": adopted}

    async def _repl_snapshot(
        self, partitions: list[int], after: str | None = None, limit: int = 1000
    ) -> dict[str, Any]:
        """A page of this primary's committed rows of ``partitions`` (key order, keys
        after ``after``) for a replica catching up. The first page waits (bounded) until
        every transaction this node is preparing or holds prepared with writes in those
        partitions when the page is asked for is resolved, so the snapshot contains their
        outcome: those replicated at an older epoch (or inherited, or recovered) never
        reached the joiner, and those of the join epoch may have been applied at the
        joiner already -- by another primary's commit notice, before its catch-up began
        -- or dropped there (a restarted joiner's records have no epoch): a page older
        than them would overwrite them. Later ones reach the joiner by replication, while
        its catch-up runs, and a page never overwrites what they wrote."""
        assert self.replication is not None
        _check_partitions(partitions)
        if type(limit) is not int or not 1 <= limit <= 10_000:
            raise txrpc.InvalidArgument("limit must be in 1..10000")
        call_epoch = await self.replication.follow_call_epoch()
        if call_epoch is not None and call_epoch > self.replication.guard.epoch:
            # Still behind the joiner's epoch: later prepares here would leave it out.
            raise txrpc.Unavailable(
                f"node {self.shard} is at epoch {self.replication.guard.epoch}, behind the joiner's {call_epoch}; "
                "it could not fetch the newer map yet",
                {"not_started": True},
            )
        if after is None:
            partition_of = self.replication.guard.shard_map.partition_of
            wanted_now = set(partitions)
            in_flight = (TxState.PREPARING, TxState.PREPARED)
            waiting = [
                tx
                for tx in list(self.core.txs.values())
                if tx.state in in_flight and tx.writes and any(partition_of(k) in wanted_now for k in tx.writes)
            ]

            def unresolved() -> bool:
                return any(self.core.txs.get(tx.txid) is tx and tx.state in in_flight for tx in waiting)

            with trio.move_on_after(self.replication.timeout_s * 6) as scope:
                while unresolved():
                    await trio.sleep(0.02)
            if scope.cancelled_caught:
                raise txrpc.Unavailable("transactions prepared here before the snapshot are still in doubt; retry")
        wanted = set(partitions)
        rows = await self.store.partition_rows(self.replication.guard.shard_map.partition_of, wanted, after, limit)
        return {"rows": [[k, v] for k, v in rows], "done": len(rows) < limit}

    async def _repl_catch_up(self, partitions: list[int]) -> dict[str, Any]:
        """Copy ``partitions`` from their current primaries (this node was just added to
        their replica sets, so replication already reaches it): stale replicated records
        of them are dropped, each primary's snapshot is installed except for keys that
        replicated commits wrote meanwhile, and keys the primaries no longer have are
        deleted. Returns ``{"rows": int, "deleted": int}``."""
        assert self.replication is not None
        replication = self.replication
        _check_partitions(partitions)
        await replication.follow_call_epoch()
        shard_map = replication.guard.shard_map
        wanted = set(partitions)
        for p in wanted:
            if not 0 <= p < shard_map.partitions or self.shard not in shard_map.replica_sets[p][1:]:
                raise txrpc.FailedPrecondition(
                    f"node {self.shard} is not a follower of partition {p} at epoch {shard_map.epoch}"
                )
        # This node's own transactions prepared before it joined (e.g. from before a
        # crash) are resolved first, by the coordinator: their outcome, applied later,
        # would overwrite newer rows of the snapshot.
        def own_pending() -> bool:
            return any(
                txid > 0
                and tx.state is TxState.PREPARED
                and self._prepared_at.get(txid, -math.inf) < replication.installed_at
                and any(shard_map.partition_of(k) in wanted for k in tx.writes)
                for txid, tx in list(self.core.txs.items())
            )

        with trio.move_on_after(replication.timeout_s * 6):
            while own_pending():
                await trio.sleep(0.05)
        if own_pending():
            raise txrpc.Unavailable(
                f"node {self.shard} still has transactions in doubt from before it joined; retry the catch-up"
            )
        # Replicated records taken before this epoch (or recovered from disk: no epoch
        # known) are superseded by the snapshot. Records of this epoch are not: the
        # primaries' snapshots leave their transactions out (replicated here), and
        # their outcome is applied here when it comes.
        for rid, tx in list(self.core.txs.items()):
            if rid >= 0 or not any(shard_map.partition_of(k) in wanted for k in tx.writes):
                continue
            await self._serialize(rid)  # one being written: decided once it is durable
            record = self.core.txs.get(rid)
            taken = self._replicated_epoch.get(rid)
            if record is not None and record.state is TxState.PREPARED and (taken is None or taken < shard_map.epoch):
                with trio.CancelScope(shield=True):  # on disk and in memory together
                    await self.store.delete_prepare(rid)
                    self._replicated_epoch.pop(rid, None)
                    self._prepared_at.pop(rid, None)
                    self._wake(self.core.abort(rid, "superseded by a catch-up snapshot"), rid)
        replication.resyncing |= wanted
        replication.touched.clear()
        copied = deleted = 0
        seen: set[str] = set()
        try:
            by_primary: dict[str, list[int]] = {}
            for p in sorted(wanted):
                by_primary.setdefault(shard_map.replica_sets[p][0], []).append(p)
            for primary, owned in sorted(by_primary.items()):
                client = await replication.client_for(primary)
                after: str | None = None
                while True:
                    with trio.fail_after(replication.timeout_s * 12):
                        page = await client.options(retries_max=2, metadata={"epoch": shard_map.epoch}).call(
                            "repl.snapshot", owned, after=after, limit=1000
                        )
                    rows = page["rows"]
                    writes: WriteSet = []
                    for key, value in rows:
                        seen.add(key)
                        if key not in replication.touched:
                            writes.append((key, False, value))
                    if writes:
                        await self._install_snapshot(writes)
                        copied += len(writes)
                    if page["done"] or not rows:
                        break
                    after = rows[-1][0]
            stale = [
                k
                for k in await self.store.partition_keys(shard_map.partition_of, wanted)
                if k not in seen and k not in replication.touched
            ]
            if stale:
                await self._install_snapshot([(k, True, None) for k in stale])
                deleted = len(stale)
        finally:
            replication.resyncing -= wanted
            if not replication.resyncing:
                replication.touched.clear()
        replication.stats["snapshot_rows"] += copied
        log.info(
            "node %s caught up on %d partitions: %d rows copied, %d deleted", self.shard, len(wanted), copied, deleted
        )
        return {"rows": copied, "deleted": deleted}

    async def _repl_drop_partitions(self, partitions: list[int]) -> dict[str, Any]:
        """Delete this node's rows of ``partitions``, which it no longer replicates (they
        moved to other nodes). Refused for a partition it still replicates."""
        assert self.replication is not None
        _check_partitions(partitions)
        await self.replication.follow_call_epoch()
        shard_map = self.replication.guard.shard_map
        for p in partitions:
            if not 0 <= p < shard_map.partitions or self.shard in shard_map.replica_sets[p]:
                raise txrpc.FailedPrecondition(
                    f"node {self.shard} still replicates partition {p} at epoch {shard_map.epoch}"
                )
        wanted = set(partitions)

        def pending() -> bool:
            # Records still being taken (an older epoch's, accepted just before this one
            # was installed) or held: their outcome is applied here first.
            return any(rid < 0 for rid in self._busy) or any(
                tx.state is TxState.PREPARED and any(shard_map.partition_of(k) in wanted for k in tx.writes)
                for tx in list(self.core.txs.values())
            )

        # Records taken before the move still get their outcome here: delete after them.
        with trio.move_on_after(self.replication.timeout_s * 6):
            while pending():
                await trio.sleep(0.02)
        keys = await self.store.partition_keys(shard_map.partition_of, wanted)
        if keys:
            await self.store.apply_commit(0, [(k, True, None) for k in keys])
        return {"deleted": len(keys)}

    async def _install_snapshot(self, writes: WriteSet) -> None:
        """Apply catch-up rows, skipping keys a replicated commit wrote meanwhile (checked
        again here: the commit may have landed while the page was on its way)."""
        assert self.replication is not None
        fresh = [w for w in writes if w[0] not in self.replication.touched]
        if fresh:
            await self.store.apply_commit(0, fresh)  # txid 0: a snapshot entry in the commit log

    async def _repl_digests(self) -> dict[str, Any]:
        """``{"epoch", "node", "partitions": [[partition, rows, digest], ...], "in_doubt"}``:
        this node's committed state per partition (primary and follower alike)."""
        assert self.replication is not None
        shard_map = self.replication.guard.shard_map
        digests = await self.store.partition_digests(shard_map.partition_of)
        return {
            "epoch": shard_map.epoch,
            "node": self.shard,
            "partitions": [[p, count, digest] for p, (count, digest) in sorted(digests.items())],
            "in_doubt": len(self.core.in_doubt()),
        }

    async def _repl_ping(self) -> dict[str, Any]:
        assert self.replication is not None
        return {"node": self.shard, "epoch": self.replication.guard.epoch}

    async def status(self, txid: int | None = None) -> dict[str, Any]:
        """The shard's status; with ``txid``, that transaction's state here (see
        :meth:`_tx_status`)."""
        if txid is not None:
            return await self._tx_status(txid)
        position, digest = await self.store.digest()
        status = {
            "shard": self.shard,
            "active": sum(1 for t in self.core.txs.values() if t.state is TxState.ACTIVE),
            "prepared": self.core.in_doubt(),
            "position": position,
            "digest": digest,
        }
        if self.replication is not None:
            status["replication"] = dict(self.replication.stats)  # counters since the start
        return status

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
            if tx is None and self.replication is not None:
                records = self.replication.records_of(txid)  # an inherited replicated record
                tx = self.core.txs.get(records[0]) if records else None
            if tx is not None:
                return {"txid": txid, "state": "prepared" if tx.state is TxState.PREPARED else "active"}
            final = self.core.finished.get(txid)
            logged = await self.store.is_committed(txid)
            if not logged and self.replication is not None:  # a replicated record of it, any origin
                logged = await self.store.is_committed_in(record_id(txid, ORIGIN_SLOTS - 1), record_id(txid, 0))
            if txid not in self.core.txs and self.core.finished.get(txid) is final:
                break  # nothing changed during the read
        if logged:
            return {"txid": txid, "state": "committed"}
        if final is TxState.COMMITTED:
            return {"txid": txid, "state": "read_only"}
        self.core.abort(txid, "unknown when its outcome was asked")  # no locks: only remembered
        return {"txid": txid, "state": "aborted"}


def _check_txid_batch(txids: Any) -> None:
    """A batch of txids (``tx.prepare_many``, ``tx.commit_many``): 1..COMMIT_MANY_MAX distinct
    positive integers, or ``InvalidArgument``."""
    if (
        type(txids) is not list
        or not 0 < len(txids) <= COMMIT_MANY_MAX
        or not all(type(t) is int and t > 0 for t in txids)
        or len(set(txids)) != len(txids)
    ):
        raise txrpc.InvalidArgument(f"txids must be 1..{COMMIT_MANY_MAX} distinct positive integers")


def _one_phase_arguments(txid: int, on_behalf_of: str = "") -> tuple[int, str]:
    """``tx.commit_one_phase``'s arguments (a TypeError, as the method's, if they do not fit)."""
    return txid, on_behalf_of


def _check_notices(txids: Any) -> None:
    if not isinstance(txids, list) or len(txids) > 10_000 or not all(type(t) is int and t > 0 for t in txids):
        raise txrpc.InvalidArgument("txids must be a list of at most 10000 positive integers")


def _check_partitions(partitions: Any) -> None:
    if not isinstance(partitions, list) or not all(type(p) is int for p in partitions):
        raise txrpc.InvalidArgument("partitions must be a list of integers")


def _describe_failures(failures: dict[str, str]) -> str:
    return "; ".join(f"{follower}: {why}" for follower, why in sorted(failures.items()))


def _write_set(tx: ParticipantTx) -> WriteSet:
    return [(k, v is TOMBSTONE, None if v is TOMBSTONE else v) for k, v in tx.writes.items()]


def _show(resource: Any) -> str:
    return "the shard (scan)" if resource == SCAN_RESOURCE else repr(resource)
