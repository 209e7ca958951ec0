"""The participant's side of the commit protocol, without I/O.

:class:`ParticipantCore` tracks the transactions a shard primary takes part in and
decides what each protocol message does; the trio driver (``_participant.py``) runs
handlers, waits for locks and writes to storage as the returned decisions say. See
``specs/commit-protocol.md``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import OrderedDict
from typing import Any

from ._locks import LockTable, Mode, Outcome


class TxState(enum.Enum):
    ACTIVE = "active"
    PREPARING = "preparing"  # prepare record being written
    PREPARED = "prepared"
    COMMITTED = "committed"
    ABORTED = "aborted"


class _Tombstone:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETED"


TOMBSTONE: Any = _Tombstone()


@dataclasses.dataclass(slots=True)
class ParticipantTx:
    txid: int
    state: TxState
    deadline: float
    last_activity: float
    writes: dict[Any, Any] = dataclasses.field(default_factory=dict)  # key -> value | TOMBSTONE
    op_results: dict[int, tuple[bool, Any]] = dataclasses.field(default_factory=dict)  # seq -> (ok, value)
    abort_reason: str = ""
    running_ops: int = 0
    owner: str = ""  # the caller identity that ran its first operation here ("" = unknown)
    epoch: int | None = None  # the shard map's epoch at its first operation here (replicated)


class Vote(enum.Enum):
    YES = "yes"
    NO = "no"
    READ_ONLY = "read_only"


class PrepareAction(enum.Enum):
    VOTE = "vote"  # answer with the vote at once
    WRITE_RECORD = "write_record"  # make the prepare record durable, then vote yes
    WAIT = "wait"  # a prepare of this txid is already writing its record


class CommitAction(enum.Enum):
    APPLY = "apply"  # apply the write set + commit-log entry in one local transaction
    ACK = "ack"  # already committed (or a read-only/forgotten transaction)
    CHECK_LOG = "check_log"  # unknown here: acknowledge if the commit log holds it


FINISHED_REMEMBERED_MAX = 100_000


class ParticipantCore:
    """Transaction bookkeeping for one shard."""

    def __init__(self, tx_idle_timeout_s: float = 10.0) -> None:
        self.tx_idle_timeout_s = tx_idle_timeout_s
        self.locks = LockTable()
        self.txs: dict[int, ParticipantTx] = {}
        # Outcomes of finished transactions, bounded (oldest forgotten first).
        self.finished: OrderedDict[int, TxState] = OrderedDict()

    # --- operations -------------------------------------------------------------------

    def begin_operation(self, txid: int, op_seq: int, now: float, deadline: float) -> tuple[str, Any]:
        """What to do with operation ``op_seq`` of ``txid``.

        Returns ``("run", tx)``, ``("replay", (ok, value))`` for a repeated op_seq, or
        ``("refuse", reason)`` when the transaction is no longer active here.
        """
        tx = self.txs.get(txid)
        if tx is None:
            final = self.finished.get(txid)
            if final is not None:
                return "refuse", f"transaction {txid} already {final.value} on this shard"
            if op_seq > 1:
                # Not this shard's first operation of the transaction, yet nothing is known
                # of it: its earlier writes were lost (a restart, or a forgotten idle
                # abort). Starting afresh would commit without them (found by TLC).
                return "refuse", f"transaction {txid} lost its earlier operations on this shard"
            tx = self.txs[txid] = ParticipantTx(txid, TxState.ACTIVE, deadline, now)
        if op_seq in tx.op_results:
            return "replay", tx.op_results[op_seq]
        if tx.state is not TxState.ACTIVE:
            return "refuse", tx.abort_reason or f"transaction {txid} is {tx.state.value}"
        tx.last_activity = now
        tx.deadline = min(tx.deadline, deadline)
        tx.running_ops += 1
        return "run", tx

    def end_operation(self, tx: ParticipantTx, op_seq: int, ok: bool, value: Any, now: float) -> None:
        tx.running_ops -= 1
        tx.last_activity = now
        tx.op_results[op_seq] = (ok, value)

    def buffer_write(self, tx: ParticipantTx, key: Any, value: Any) -> None:
        assert tx.state is TxState.ACTIVE, tx.state
        tx.writes[key] = value

    # --- phase 1 ----------------------------------------------------------------------------

    def prepare(self, txid: int) -> tuple[PrepareAction, Vote | None, str, list[Any]]:
        """Phase 1. Returns (action, vote, reason, lock requests granted by a release)."""
        tx = self.txs.get(txid)
        if tx is None:
            final = self.finished.get(txid)
            if final is TxState.COMMITTED:
                return PrepareAction.VOTE, Vote.YES, "already committed", []
            return PrepareAction.VOTE, Vote.NO, f"transaction {txid} unknown or aborted on this shard", []
        if tx.state is TxState.PREPARED:
            return PrepareAction.VOTE, Vote.YES, "already prepared", []
        if tx.state is TxState.PREPARING:
            return PrepareAction.WAIT, None, "", []
        if tx.state is not TxState.ACTIVE:
            return PrepareAction.VOTE, Vote.NO, tx.abort_reason or tx.state.value, []
        if tx.running_ops:
            reason = "prepare arrived while an operation was still running"
            return PrepareAction.VOTE, Vote.NO, reason, self.abort(txid, reason)
        if not tx.writes:
            # Read-only: nothing to commit; locks released now (it leaves after phase 1).
            return PrepareAction.VOTE, Vote.READ_ONLY, "", self._finish(tx, TxState.COMMITTED)
        tx.state = TxState.PREPARING
        return PrepareAction.WRITE_RECORD, None, "", []

    def prepared(self, txid: int) -> bool:
        """The prepare record is durable. False if the transaction was aborted while
        the record was being written (the driver then deletes the record)."""
        tx = self.txs.get(txid)
        if tx is None or tx.state is not TxState.PREPARING:
            return False
        tx.state = TxState.PREPARED
        return True

    def prepare_failed(self, txid: int, reason: str) -> list[Any]:
        """The prepare could not be made durable (here or on a replica): this shard votes
        no and aborts the transaction on its own, as a no voter may. Returns the lock
        requests granted as a result. (Only while PREPARING: once :meth:`prepared` said
        yes, only the coordinator's word ends it.)"""
        tx = self.txs.get(txid)
        if tx is not None and tx.state is TxState.PREPARING:
            tx.state = TxState.ACTIVE
            return self.abort(txid, reason)
        return []

    def restore_prepared(
        self, txid: int, writes: dict[Any, Any], locks: list[tuple[Any, Mode]], now: float
    ) -> None:
        """Recovery: a prepare record found on disk; its locks are re-taken at once."""
        tx = ParticipantTx(txid, TxState.PREPARED, float("inf"), now, dict(writes))
        self.txs[txid] = tx
        for resource, mode in locks:
            outcome = self.locks.acquire(txid, resource, mode)
            assert outcome is Outcome.GRANTED, f"recovered locks conflict on {resource!r}"

    # --- phase 2 ----------------------------------------------------------------------------

    def commit(self, txid: int) -> CommitAction:
        tx = self.txs.get(txid)
        if tx is None:
            if self.finished.get(txid) is TxState.COMMITTED:
                return CommitAction.ACK
            return CommitAction.CHECK_LOG
        if tx.state is TxState.PREPARED:
            return CommitAction.APPLY
        raise ProtocolViolation(f"commit of transaction {txid} in state {tx.state.value} (not prepared)")

    def one_phase_ready(self, txid: int) -> tuple[bool, str]:
        """For commit_one_phase: may this transaction commit here right now?"""
        tx = self.txs.get(txid)
        if tx is None:
            if self.finished.get(txid) is TxState.COMMITTED:
                return True, "already committed"
            return False, f"transaction {txid} unknown or aborted on this shard"
        if tx.state is not TxState.ACTIVE or tx.running_ops:
            return False, tx.abort_reason or f"transaction {txid} is {tx.state.value}"
        tx.state = TxState.PREPARING
        return True, ""

    def committed(self, txid: int) -> list[Any]:
        """The write set is applied durably; release locks. Returns granted lock requests."""
        tx = self.txs.get(txid)
        if tx is None:
            return []
        return self._finish(tx, TxState.COMMITTED)

    def abort(self, txid: int, reason: str) -> list[Any]:
        """Abort ``txid`` here (idempotent). Returns lock requests granted as a result.
        Aborting a PREPARED transaction is legal only on the coordinator's word."""
        tx = self.txs.get(txid)
        if tx is None:
            self.finished.setdefault(txid, TxState.ABORTED)
            return []
        tx.abort_reason = tx.abort_reason or reason
        return self._finish(tx, TxState.ABORTED)

    def _finish(self, tx: ParticipantTx, state: TxState) -> list[Any]:
        tx.state = state
        del self.txs[tx.txid]
        self.finished[tx.txid] = state
        while len(self.finished) > FINISHED_REMEMBERED_MAX:
            self.finished.popitem(last=False)
        return self.locks.release_all(tx.txid)

    # --- timeouts ----------------------------------------------------------------------------

    def expired(self, now: float) -> list[int]:
        """ACTIVE transactions idle past ``tx_idle_timeout_s`` or past their deadline.
        PREPARED ones are never returned: only the coordinator decides them."""
        out = []
        for txid, tx in self.txs.items():
            if tx.state is TxState.ACTIVE and tx.running_ops == 0:
                if now - tx.last_activity >= self.tx_idle_timeout_s or now >= tx.deadline:
                    out.append(txid)
        return out

    def in_doubt(self) -> list[int]:
        return sorted(t for t, tx in self.txs.items() if tx.state is TxState.PREPARED)


class ProtocolViolation(Exception):
    """A message that the protocol says can never arrive in this state."""
