"""Every interleaving of the commit protocol's messages for 2 and 3 participants, with
duplicated and lost messages, timeouts and retries, run on the sans-IO cores (the same
objects the trio drivers use). Explicit-state search with a visited set."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest

from coordinator._coordinator_core import CoordinatorCore, Decision, Phase
from coordinator._locks import LockTable, Mode
from coordinator._participant_core import CommitAction, ParticipantCore, PrepareAction, TxState, Vote

TXID = 1


@dataclass
class World:
    coord: CoordinatorCore
    parts: dict[str, ParticipantCore]
    net: list[tuple[str, ...]]  # messages in flight (a bag)
    dups_left: int = 1  # budget of duplicated deliveries
    losses_left: int = 1  # budget of lost messages
    asks_left: int = 1  # budget of decision queries by in-doubt participants
    commit_log: dict[str, bool] = field(default_factory=dict)  # participant applied the commit
    decided: str | None = None  # what the coordinator decided, once
    resends: int = 0
    votes_no: frozenset[str] = frozenset()

    def key(self) -> tuple[object, ...]:
        tx = self.coord.get(TXID)
        return (
            tx.phase.value if tx else None,
            tuple(sorted(tx.votes.items())) if tx else (),
            tuple(sorted(tx.acked)) if tx else (),
            tuple((n, _state(p)) for n, p in sorted(self.parts.items())),
            tuple(sorted(self.net)),
            self.dups_left,
            self.losses_left,
            self.asks_left,
            tuple(sorted(self.commit_log.items())),
            self.resends,
        )


def _clone_locks(table: LockTable) -> LockTable:
    return table.copy()


def _clone_participant(core: ParticipantCore) -> ParticipantCore:
    new = ParticipantCore.__new__(ParticipantCore)
    new.tx_idle_timeout_s = core.tx_idle_timeout_s
    new.locks = _clone_locks(core.locks)
    new.txs = {
        t: dataclasses.replace(tx, writes=dict(tx.writes), op_results=dict(tx.op_results))
        for t, tx in core.txs.items()
    }
    new.finished = OrderedDict(core.finished)
    return new


def _clone_coordinator(core: CoordinatorCore) -> CoordinatorCore:
    new = copy.copy(core)
    new.txs = {
        t: dataclasses.replace(tx, votes=dict(tx.votes), acked=set(tx.acked)) for t, tx in core.txs.items()
    }
    new.finished = OrderedDict(
        (t, dataclasses.replace(tx, votes=dict(tx.votes), acked=set(tx.acked)))
        for t, tx in core.finished.items()
    )
    return new


def clone(w: World) -> World:
    return dataclasses.replace(
        w,
        coord=_clone_coordinator(w.coord),
        parts={n: _clone_participant(p) for n, p in w.parts.items()},
        net=list(w.net),
        commit_log=dict(w.commit_log),
    )


def _state(p: ParticipantCore) -> str:
    tx = p.txs.get(TXID)
    if tx is not None:
        return tx.state.value
    final = p.finished.get(TXID)
    return final.value if final else "none"


def initial(n: int, votes_no: frozenset[str] = frozenset()) -> World:
    coord = CoordinatorCore(txid_block_size=10)
    coord.block_written(coord.needs_block() or 0)
    assert coord.begin(0.0).txid == TXID
    parts = {}
    for i in range(n):
        name = f"p{i}"
        core = ParticipantCore(tx_idle_timeout_s=1.0)
        action, tx = core.begin_operation(TXID, 1, 0.0, 100.0)
        assert action == "run"
        assert core.locks.acquire(TXID, f"k{i}", Mode.X).value == "granted"
        core.buffer_write(tx, f"k{i}", i)
        core.end_operation(tx, 1, True, None, 0.0)
        parts[name] = core
    names = tuple(sorted(parts))
    kind, ctx = coord.start_commit(TXID, names, 0.0)
    assert kind == "prepare" and ctx is not None
    return World(coord, parts, [("prepare", p) for p in names], votes_no=votes_no)


def successors(w: World) -> list[tuple[str, World]]:
    out: list[tuple[str, World]] = []
    for message in sorted(set(w.net)):
        # deliver it; with the duplication budget, deliver it and leave a copy in flight
        for keep in (False, True):
            if keep and w.dups_left == 0:
                continue
            nw = clone(w)
            if keep:
                nw.dups_left -= 1
            else:
                nw.net.remove(message)
            deliver(nw, message)
            out.append((f"deliver{'+dup' if keep else ''} {message}", nw))
        if w.losses_left:
            nw = clone(w)
            nw.net.remove(message)
            nw.losses_left -= 1
            out.append((f"lose {message}", nw))
    tx = w.coord.get(TXID)
    assert tx is not None
    if tx.phase is Phase.PREPARING:
        for p in tx.participants:
            if p not in tx.votes:  # prepare timed out: presumed abort
                nw = clone(w)
                ntx = nw.coord.get(TXID)
                assert ntx is not None
                nw.coord.prepare_failed(ntx, p, "timeout")
                nw.net += [("abort", q) for q in ntx.participants]
                out.append((f"timeout waiting for {p}", nw))
                break
    if tx.phase in (Phase.COMMITTING, Phase.ABORTING) and w.resends < 1:
        nw = clone(w)
        ntx = nw.coord.get(TXID)
        assert ntx is not None
        kind = "commit" if ntx.phase is Phase.COMMITTING else "abort"
        targets = ntx.writers if kind == "commit" else nw.coord.abort_targets(ntx)
        nw.net += [(kind, p) for p in targets if p not in ntx.acked]
        nw.resends += 1
        out.append(("resend phase 2", nw))
    for name, part in w.parts.items():
        if part.expired(10.0):  # idle timeout of an ACTIVE (unprepared) transaction
            nw = clone(w)
            nw.parts[name].abort(TXID, "idle")
            out.append((f"idle timeout at {name}", nw))
        if part.in_doubt() and w.asks_left:  # termination protocol: ask the coordinator
            d = w.coord.decision(TXID)
            if d is not None:
                nw = clone(w)
                nw.asks_left -= 1
                nw.net.append(("commit" if d is Decision.COMMIT else "abort", name))
                out.append((f"{name} asks, told {d.value}", nw))
    return out


def deliver(w: World, message: tuple[str, ...]) -> None:
    kind, name = message[0], message[1]
    tx = w.coord.get(TXID)
    assert tx is not None
    if kind == "prepare":
        part = w.parts[name]
        if name in w.votes_no and TXID in part.txs and part.txs[TXID].state is TxState.ACTIVE:
            part.abort(TXID, "user abort")
        action, vote, _reason, _ = part.prepare(TXID)
        if action is PrepareAction.WRITE_RECORD:
            assert part.prepared(TXID)
            vote = Vote.YES
        assert vote is not None
        w.net.append(("vote", name, vote.value))
    elif kind == "vote":
        decision = w.coord.vote(tx, name, message[2])
        if decision is Decision.COMMIT and tx.phase is Phase.PREPARING:
            w.decided = "commit"  # the durable decision record
            w.coord.commit_decided(tx)
            w.net += [("commit", p) for p in tx.writers]
        elif decision is Decision.ABORT and tx.phase is Phase.ABORTING and w.decided is None:
            w.decided = "abort"
            w.net += [("abort", p) for p in tx.participants]
    elif kind == "commit":
        part = w.parts[name]
        action = part.commit(TXID)
        if action is CommitAction.APPLY:
            w.commit_log[name] = True
            part.committed(TXID)
        elif action is CommitAction.CHECK_LOG:
            assert w.commit_log.get(name), f"commit for {name} that never prepared"
        w.net.append(("ack", name))
    elif kind == "abort":
        part = w.parts[name]
        assert not w.commit_log.get(name), f"abort after {name} committed"
        part.abort(TXID, "coordinator")
        w.net.append(("ack", name))
    elif kind == "ack":
        if tx.phase in (Phase.COMMITTING, Phase.ABORTING):
            w.coord.acked(tx, name)


def check(w: World) -> None:
    finals = {n: _state(p) for n, p in w.parts.items()}
    committed = {n for n, s in finals.items() if s == "committed"}
    aborted = {n for n, s in finals.items() if s == "aborted"}
    assert not (committed and aborted), f"atomicity: committed {committed}, aborted {aborted}"
    if committed or any(w.commit_log.values()):
        assert w.decided == "commit", "a participant committed without a commit decision"
    tx = w.coord.get(TXID)
    assert tx is not None
    if w.decided == "commit":
        assert tx.decision is Decision.COMMIT, "the decision changed"
        assert set(tx.votes) == set(tx.participants) and all(v == "yes" for v in tx.votes.values())
    if w.decided == "abort":
        assert tx.decision is Decision.ABORT, "the decision changed"
    for p in w.parts.values():
        p.locks.check_invariants()


def explore(world: World, states_max: int) -> tuple[int, set[str]]:
    seen: set[tuple[object, ...]] = set()
    stack = [world]
    outcomes: set[str] = set()
    while stack:
        w = stack.pop()
        k = w.key()
        if k in seen:
            continue
        seen.add(k)
        assert len(seen) <= states_max, "state space larger than expected"
        check(w)
        nexts = successors(w)
        if not nexts:
            outcomes.add(w.decided or "undecided")
            # Quiescent: every participant that voted yes learned the outcome, unless its
            # messages were lost and it can still ask (then it has a successor).
            for name, part in w.parts.items():
                assert not part.in_doubt() or w.coord.decision(TXID) is None, f"{name} stuck in doubt"
        stack.extend(n for _, n in nexts)
    return len(seen), outcomes


SLOW = bool(os.environ.get("TXRPC_SLOW"))

# (participants, duplicated deliveries, lost messages, phase-2 resends, voting no)
CONFIGS = [
    pytest.param(2, 1, 1, 1, (), id="2p-dup-loss-resend"),
    pytest.param(2, 1, 1, 1, ("p0",), id="2p-one-no-dup-loss-resend"),
    pytest.param(3, 0, 0, 1, (), id="3p-resend"),
    pytest.param(3, 0, 0, 1, ("p1",), id="3p-one-no"),
    pytest.param(
        3,
        1,
        1,
        1,
        (),
        id="3p-dup-loss-resend",
        marks=pytest.mark.skipif(not SLOW, reason="minutes: TXRPC_SLOW=1"),
    ),
]


@pytest.mark.parametrize(("participants", "dups", "losses", "resends", "voting_no"), CONFIGS)
def test_every_interleaving_is_atomic(
    participants: int, dups: int, losses: int, resends: int, voting_no: tuple[str, ...]
) -> None:
    world = initial(participants, frozenset(voting_no))
    world.dups_left, world.losses_left, world.resends = dups, losses, 1 - resends
    states, outcomes = explore(world, states_max=5_000_000)
    assert states > 1000
    if voting_no:
        assert outcomes <= {"abort", "undecided"} and "abort" in outcomes
    else:
        assert "commit" in outcomes
        if losses:
            assert "abort" in outcomes  # a lost prepare or vote times out into an abort


def test_the_checker_catches_a_broken_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutant: commit as soon as the first yes arrives. The search must find a violation."""
    original = CoordinatorCore.vote

    def eager(self: CoordinatorCore, tx, participant, vote, reason=""):  # type: ignore[no-untyped-def]
        result = original(self, tx, participant, vote, reason)
        if vote == "yes" and tx.phase is Phase.PREPARING:
            tx.votes.update({p: "yes" for p in tx.participants})
            return Decision.COMMIT
        return result

    monkeypatch.setattr(CoordinatorCore, "vote", eager)
    with pytest.raises(AssertionError):
        explore(initial(2, frozenset({"p1"})), states_max=200_000)
