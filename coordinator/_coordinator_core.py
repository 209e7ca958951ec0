"""The coordinator's side of two-phase commit with presumed abort, without I/O.

:class:`CoordinatorCore` hands out transaction ids, tracks each transaction and says
what must happen next; the trio driver (``_coordinator.py``) sends the messages and
writes the durable records it is told to. See ``specs/commit-protocol.md``.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from collections import OrderedDict, deque


class Phase(enum.Enum):
    ACTIVE = "active"
    PREPARING = "preparing"
    COMMITTING = "committing"  # commit decision durable; phase 2 running
    ABORTING = "aborting"
    COMMITTED = "committed"  # every writing participant acknowledged
    ABORTED = "aborted"


class Decision(enum.Enum):
    COMMIT = "commit"
    ABORT = "abort"


@dataclasses.dataclass(slots=True)
class CoordTx:
    txid: int
    phase: Phase
    deadline: float
    participants: tuple[str, ...] = ()
    votes: dict[str, str] = dataclasses.field(default_factory=dict)
    acked: set[str] = dataclasses.field(default_factory=set)
    reason: str = ""
    heuristic: bool = False
    owner: str = ""
    """The identity that began or leased it ("" when the coordinator does not
    authenticate callers, or the transaction is from before a restart)."""
    on_behalf_of: str = ""
    """Who asked to re-drive a one-phase commit whose owner is unknown here."""

    @property
    def decision(self) -> Decision | None:
        if self.phase in (Phase.COMMITTING, Phase.COMMITTED):
            return Decision.COMMIT
        if self.phase in (Phase.ABORTING, Phase.ABORTED):
            return Decision.ABORT
        return None

    @property
    def writers(self) -> tuple[str, ...]:
        """Participants that must hear phase 2 (read-only voters left after phase 1)."""
        return tuple(p for p in self.participants if self.votes.get(p) != "read_only")


FINISHED_REMEMBERED_MAX = 100_000
LEASES_PER_OWNER_MAX = 10_000
"""Leases with ids still unused that one identity may hold (an authenticating
coordinator remembers their owner until every id has begun). Beyond it the identity's
oldest lease is forgotten: its unused ids become unknown (a commit is refused
retryably and the client leases afresh). A hoarder only evicts its own leases."""
UNANSWERED_REMEMBERED_MAX = 100_000


@dataclasses.dataclass(slots=True)
class _Lease:
    end: int
    owner: str
    unused: int


class CoordinatorCore:
    """All transactions of one coordinator.

    Transaction ids come from a durable high-water mark written in blocks: ``begin``
    says when a new block must be made durable before the id may be handed out. After a
    restart :meth:`recover` starts at the next block, so any txid below ``first_txid``
    without a commit record can never commit (presumed abort is then safe).
    """

    def __init__(self, txid_block_size: int = 1000, tx_timeout_s: float = 30.0) -> None:
        self.txid_block_size = txid_block_size
        self.tx_timeout_s = tx_timeout_s
        self.next_txid = 1
        self.block_end = 0  # ids < block_end are covered by a durable block record
        self.first_txid = 1  # ids below this belong to an earlier incarnation
        self.txs: dict[int, CoordTx] = {}
        self.finished: OrderedDict[int, CoordTx] = OrderedDict()
        # Ownership (only on a coordinator that authenticates callers: owners_tracked).
        # Leases of this incarnation with ids not yet begun, by first id; the sorted firsts
        # may hold forgotten ones (skipped, compacted now and then).
        self.owners_tracked = False
        self._leases: dict[int, _Lease] = {}
        self._lease_firsts: list[int] = []
        self._leases_of_owner: dict[str, deque[int]] = {}
        self._unanswered: OrderedDict[int, str] = OrderedDict()  # one-phase attempts forgotten

    # --- ids -------------------------------------------------------------------------------

    def recover(
        self, durable_block_end: int, commit_records: list[tuple[int, tuple[str, ...], set[str]]]
    ) -> list[int]:
        """Restart from the durable state: the id high-water mark and the commit
        records whose phase 2 is incomplete. Returns the txids to re-drive."""
        self.next_txid = self.first_txid = max(durable_block_end, 1)
        self.block_end = durable_block_end
        redo = []
        for txid, participants, acked in commit_records:
            tx = CoordTx(
                txid,
                Phase.COMMITTING,
                float("inf"),
                participants,
                {p: "yes" for p in participants},
                set(acked),
            )
            self.txs[txid] = tx
            redo.append(txid)
        return redo

    def needs_block(self) -> int | None:
        """If the next id is not covered by a durable block, the new block end to write."""
        if self.next_txid >= self.block_end:
            return self.next_txid + self.txid_block_size
        return None

    def block_written(self, block_end: int) -> None:
        self.block_end = max(self.block_end, block_end)

    def needs_block_for(self, count: int) -> int | None:
        """Like :meth:`needs_block`, for handing out ``count`` ids at once."""
        if self.next_txid + count > self.block_end:
            return self.next_txid + max(count, self.txid_block_size)
        return None

    def lease(self, count: int, owner: str = "") -> tuple[int, int]:
        """Hand out ``count`` consecutive txids for ``owner`` to use (no per-transaction
        state until its commit or abort arrives). Returns ``(first, count)``."""
        assert self.next_txid + count <= self.block_end, "write the id block first (needs_block_for)"
        first = self.next_txid
        self.next_txid += count
        if owner:
            self.owners_tracked = True
            self._leases[first] = _Lease(first + count, owner, count)
            self._lease_firsts.append(first)  # ids only grow: stays sorted
            mine = self._leases_of_owner.setdefault(owner, deque())
            mine.append(first)
            while len(mine) > LEASES_PER_OWNER_MAX:
                self._leases.pop(mine.popleft(), None)
            if len(self._lease_firsts) > 2 * len(self._leases) + 1024:
                self._lease_firsts = sorted(self._leases)
        return first, count

    def _lease_of(self, txid: int) -> tuple[int, _Lease] | None:
        """The remembered lease holding ``txid`` (its first id and record), or None.
        Leases are disjoint and handed out in id order, so only the last one starting at
        or before ``txid`` can hold it (forgotten ones stay in the list until compacted)."""
        firsts = self._lease_firsts
        i = bisect.bisect_right(firsts, txid) - 1
        if i < 0:
            return None
        lease = self._leases.get(firsts[i])
        if lease is None or txid >= lease.end:
            return None
        return firsts[i], lease

    def owner_of(self, txid: int) -> str:
        """Who began or leased ``txid`` ("" if unknown here or not authenticated)."""
        tx = self.get(txid)
        if tx is not None:
            return tx.owner
        if txid in self._unanswered:
            return self._unanswered[txid]
        found = self._lease_of(txid)
        return "" if found is None else found[1].owner

    def _adopt_leased(self, txid: int, now: float) -> CoordTx | None:
        """A txid this incarnation handed out but has no state for: it begins now. When
        owners are tracked, only an id whose lease (or forgotten one-phase attempt) is
        remembered, owned by that lease's owner."""
        if txid in self.finished:
            return None
        if not self.owners_tracked:
            if not self.first_txid <= txid < self.next_txid:
                return None
            owner = ""
        elif txid in self._unanswered:
            owner = self._unanswered.pop(txid)
        else:
            found = self._lease_of(txid)
            if found is None:
                return None
            first, lease = found
            owner = lease.owner
            lease.unused -= 1
            if lease.unused <= 0:
                del self._leases[first]
        tx = CoordTx(txid, Phase.ACTIVE, now + self.tx_timeout_s, owner=owner)
        self.txs[txid] = tx
        return tx

    def begin(self, now: float, timeout_s: float | None = None, owner: str = "") -> CoordTx:
        assert self.next_txid < self.block_end, "write the id block first (needs_block)"
        txid = self.next_txid
        self.next_txid += 1
        if owner:
            self.owners_tracked = True
        tx = CoordTx(txid, Phase.ACTIVE, now + (timeout_s or self.tx_timeout_s), owner=owner)
        self.txs[txid] = tx
        return tx

    # --- lookups -----------------------------------------------------------------------------

    def get(self, txid: int) -> CoordTx | None:
        return self.txs.get(txid) or self.finished.get(txid)

    def decision(self, txid: int) -> Decision | None:
        """What a participant asking about ``txid`` is told: COMMIT, ABORT, or None
        (still undecided: ask again). Unknown txids are aborted (presumed abort)."""
        tx = self.get(txid)
        if tx is None:
            # Never handed out, from an earlier incarnation, or leased but never asked to
            # commit: presumed abort -- and remembered, so a late commit is refused.
            self.forget_as_aborted(txid, "presumed abort (unknown when asked)")
            return Decision.ABORT
        if tx.phase is Phase.ACTIVE:
            # A prepared participant asks while the client has not committed: the
            # transaction may still commit; it is not ours to abort unless it expired.
            return None
        return tx.decision

    # --- commit ------------------------------------------------------------------------------

    def start_commit(
        self, txid: int, participants: tuple[str, ...], now: float
    ) -> tuple[str, CoordTx | None]:
        """Client asks to commit. Returns:
        ``("unknown", None)`` → no state: look for a record, else presumed abort, except
        for one participant (:meth:`redrive_one_phase`);
        ``("done", tx)`` → answer the recorded outcome;
        ``("wait", tx)`` → a commit of this txid is in progress: wait for it;
        ``("prepare", tx)`` → run phase 1 on ``tx.participants`` (several);
        ``("one_phase", tx)`` → send commit_one_phase to the only participant;
        ``("commit_empty", tx)`` → no participants: committed at once.
        """
        tx = self.txs.get(txid)
        if tx is None:
            done = self.finished.get(txid)
            if done is not None:
                return "done", done
            tx = self._adopt_leased(txid, now)
            if tx is None:
                return "unknown", None
        if tx.phase is not Phase.ACTIVE:
            return "wait", tx
        if now >= tx.deadline:
            self.abort(tx, "transaction timed out before commit")
            return "done", tx
        tx.participants = tuple(sorted(set(participants)))
        if not tx.participants:
            tx.phase = Phase.COMMITTED
            self._finish(tx)
            return "commit_empty", tx
        tx.phase = Phase.PREPARING
        if len(tx.participants) == 1:
            return "one_phase", tx
        return "prepare", tx

    def redrive_one_phase(
        self, txid: int, participants: tuple[str, ...], now: float
    ) -> tuple[str, CoordTx | None]:
        """:meth:`start_commit` said ``"unknown"`` and the log holds no record of
        ``txid``. With exactly one participant and a txid handed out before (by an
        earlier incarnation) the transaction may have committed there in one phase, which
        leaves no coordinator record: presuming abort could contradict the participant.
        So it is driven again as one-phase commit (``("one_phase", tx)``); the participant
        answers from its commit log, or commits an ACTIVE transaction exactly once, or
        aborts. Otherwise ``("unknown", None)``: presumed abort. If the txid became
        known meanwhile, answers as :meth:`start_commit` does."""
        if txid in self.txs or txid in self.finished or txid >= self.first_txid:
            return self.start_commit(txid, participants, now)
        parts = tuple(sorted(set(participants)))
        if len(parts) != 1 or txid < 1:
            return "unknown", None
        tx = CoordTx(txid, Phase.PREPARING, now + self.tx_timeout_s, parts)
        self.txs[txid] = tx
        return "one_phase", tx

    def one_phase_unanswered(self, tx: CoordTx) -> None:
        """The only participant did not answer a one-phase commit: it alone decides, and
        may have committed. Forget the attempt (no decision here) so that a retried
        commit asks the participant again instead of waiting for this one."""
        if tx.phase is Phase.PREPARING and self.txs.get(tx.txid) is tx:
            del self.txs[tx.txid]
            if self.owners_tracked:  # the retry adopts it again, for the same owner
                self._unanswered[tx.txid] = tx.owner
                while len(self._unanswered) > UNANSWERED_REMEMBERED_MAX:
                    self._unanswered.popitem(last=False)

    def vote(self, tx: CoordTx, participant: str, vote: str, reason: str = "") -> Decision | None:
        """Record a vote; returns the decision once it is determined (COMMIT must then
        be made durable before phase 2; ABORT needs no record)."""
        if tx.phase is not Phase.PREPARING:
            return tx.decision
        assert participant in tx.participants, participant
        tx.votes[participant] = vote
        if vote == "no":
            self.abort(tx, reason or f"{participant} voted no")
            return Decision.ABORT
        if all(p in tx.votes for p in tx.participants):
            return Decision.COMMIT
        return None

    def prepare_failed(self, tx: CoordTx, participant: str, reason: str) -> None:
        """A prepare could not be delivered in time: abort (no commit record exists)."""
        if tx.phase is Phase.PREPARING:
            self.abort(tx, f"{participant} unreachable during prepare: {reason}")

    def commit_decided(self, tx: CoordTx) -> None:
        """The commit record is durable: phase 2 may start."""
        assert tx.phase is Phase.PREPARING and all(v != "no" for v in tx.votes.values())
        assert set(tx.votes) == set(tx.participants), "commit without every vote"
        tx.phase = Phase.COMMITTING
        if not tx.writers:
            tx.phase = Phase.COMMITTED
            self._finish(tx)

    def one_phase_result(self, tx: CoordTx, committed: bool, reason: str = "") -> None:
        if committed:
            tx.phase = Phase.COMMITTED
            tx.votes = {p: "yes" for p in tx.participants}
            tx.acked = set(tx.participants)
            self._finish(tx)
        else:
            self.abort(tx, reason or "participant aborted the one-phase commit")
            tx.acked = set(tx.participants)
            self._finish(tx)

    def forget_as_aborted(self, txid: int, reason: str) -> None:
        """Record ``txid`` as aborted without any state for it (presumed abort)."""
        if txid not in self.txs and txid not in self.finished and self.first_txid <= txid < self.next_txid:
            tx = CoordTx(txid, Phase.ABORTED, 0.0, reason=reason)
            self._finish(tx)

    def abort(self, tx: CoordTx, reason: str) -> None:
        if tx.decision is Decision.COMMIT:
            raise AssertionError(f"abort of transaction {tx.txid} after the commit decision")
        if tx.phase in (Phase.ABORTING, Phase.ABORTED):
            return
        tx.reason = tx.reason or reason
        tx.phase = Phase.ABORTING

    def acked(self, tx: CoordTx, participant: str) -> bool:
        """A phase-2 acknowledgement; True when the transaction is now complete."""
        tx.acked.add(participant)
        if tx.phase is Phase.COMMITTING and set(tx.writers) <= tx.acked:
            tx.phase = Phase.COMMITTED
            self._finish(tx)
            return True
        if tx.phase is Phase.ABORTING and set(tx.participants) <= tx.acked:
            tx.phase = Phase.ABORTED
            self._finish(tx)
            return True
        return False

    def abort_targets(self, tx: CoordTx) -> tuple[str, ...]:
        return tuple(p for p in tx.participants if p not in tx.acked and tx.votes.get(p) != "read_only")

    def finish_abort(self, tx: CoordTx) -> None:
        """Abort with nobody left to tell (no participants, or all acked)."""
        tx.phase = Phase.ABORTED
        self._finish(tx)

    def _finish(self, tx: CoordTx) -> None:
        self.txs.pop(tx.txid, None)
        self.finished[tx.txid] = tx
        while len(self.finished) > FINISHED_REMEMBERED_MAX:
            self.finished.popitem(last=False)

    # --- timeouts ----------------------------------------------------------------------------

    def expired(self, now: float) -> list[CoordTx]:
        """ACTIVE transactions past their deadline (to be aborted)."""
        return [tx for tx in self.txs.values() if tx.phase is Phase.ACTIVE and now >= tx.deadline]

    def in_doubt(self) -> list[CoordTx]:
        return [
            tx for tx in self.txs.values() if tx.phase in (Phase.PREPARING, Phase.COMMITTING, Phase.ABORTING)
        ]
