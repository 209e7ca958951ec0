"""Wait-die lock table: compatibility, FIFO, upgrades, and no deadlock under any schedule."""

from __future__ import annotations

import networkx as nx
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator._locks import DIE, GRANTED, WAIT, LockTable, Mode


def test_shared_locks_are_shared_exclusive_are_not() -> None:
    t = LockTable()
    assert t.acquire(1, "a", Mode.S) is GRANTED
    assert t.acquire(2, "a", Mode.S) is GRANTED
    assert t.acquire(3, "a", Mode.X) is DIE  # younger than holders: dies
    assert t.holders("a") == {1: Mode.S, 2: Mode.S}


def test_older_waits_younger_dies() -> None:
    t = LockTable()
    assert t.acquire(5, "k", Mode.X) is GRANTED
    assert t.acquire(3, "k", Mode.X) is WAIT  # older than the holder
    assert t.acquire(7, "k", Mode.S) is DIE  # younger than the holder
    granted = t.release_all(5)
    assert [(r.txid, r.mode) for r in granted] == [(3, Mode.X)]
    assert t.holders("k") == {3: Mode.X}


def test_upgrade_from_shared_to_exclusive() -> None:
    t = LockTable()
    assert t.acquire(1, "k", Mode.S) is GRANTED
    assert t.acquire(1, "k", Mode.X) is GRANTED  # sole holder upgrades at once
    assert t.holders("k") == {1: Mode.X}
    assert t.acquire(1, "k", Mode.S) is GRANTED  # already stronger
    t2 = LockTable()
    t2.acquire(1, "k", Mode.S)
    t2.acquire(2, "k", Mode.S)
    assert t2.acquire(2, "k", Mode.X) is DIE  # younger upgrader dies
    assert t2.acquire(1, "k", Mode.X) is WAIT  # older upgrader waits for 2
    assert [(r.txid, r.mode) for r in t2.release_all(2)] == [(1, Mode.X)]


def test_no_overtaking_queued_conflicting_requests() -> None:
    t = LockTable()
    t.acquire(9, "k", Mode.S)
    assert t.acquire(2, "k", Mode.X) is WAIT  # queued behind holder 9
    assert t.acquire(5, "k", Mode.S) is DIE  # compatible with holder, but 2 (older) waits ahead
    assert t.acquire(1, "k", Mode.S) is WAIT  # older than everyone ahead: waits in line
    granted = t.release_all(9)
    assert [r.txid for r in granted] == [2]
    assert [r.txid for r in t.release_all(2)] == [1]


def test_scan_lock_conflicts_with_writers_intention_lock() -> None:
    t = LockTable()
    assert t.acquire(1, ("scan", None), Mode.IX) is GRANTED
    assert t.acquire(2, ("scan", None), Mode.IX) is GRANTED  # writers coexist
    assert t.acquire(3, ("scan", None), Mode.S) is DIE  # a younger scan dies
    assert t.acquire(0, ("scan", None), Mode.S) is WAIT  # an older scan waits for the writers
    t.release_all(1)
    assert [r.txid for r in t.release_all(2)] == [0]


def test_intention_locks_among_themselves_are_granted_at_once_and_never_overtake() -> None:
    """Every writer takes IX on the shard's SCAN resource, so it has many holders; an IX
    request is granted without looking at them while none holds anything else and none
    is queued -- and only then: a scan (S) held or queued still stops it."""
    scan = ("scan", None)
    t = LockTable()
    for txid in (3, 4, 5):
        assert t.acquire(txid, scan, Mode.IX) is GRANTED
    assert t.acquire(2, scan, Mode.S) is WAIT  # an older scan waits for the writers
    assert t.acquire(6, scan, Mode.IX) is DIE  # a younger writer may not overtake it
    assert t.acquire(1, scan, Mode.IX) is WAIT  # an older one queues behind it
    t.check_invariants()
    for txid in (3, 4, 5):
        t.release_all(txid)
    assert t.holders(scan) == {2: Mode.S}  # the scan got it; the IX behind it still waits
    assert [r.txid for r in t.release_all(2)] == [1]
    t.check_invariants()
    assert t.acquire(7, scan, Mode.IX) is GRANTED  # IX among IX again
    assert t.acquire(7, scan, Mode.S) is DIE  # an upgrade to S+IX (= X) conflicts with 1's IX
    t.check_invariants()


def test_a_second_queued_request_of_one_transaction_never_weakens_its_lock() -> None:
    """Two operations of one transaction wait on one key, X then S: once granted, it
    holds X (not S, which would let another transaction read past its pending write).
    (Found by review.)"""
    t = LockTable()
    assert t.acquire(5, "k", Mode.X) is GRANTED
    assert t.acquire(1, "k", Mode.X) is WAIT
    assert t.acquire(1, "k", Mode.S) is WAIT  # the same transaction's other operation
    assert [r.txid for r in t.release_all(5)] == [1, 1]
    assert t.holders("k") == {1: Mode.X}
    assert t.acquire(0, "k", Mode.S) is WAIT  # an older reader waits for the writer
    assert t.acquire(2, "k", Mode.S) is DIE
    t.check_invariants()


def test_cancel_withdraws_a_waiter() -> None:
    t = LockTable()
    t.acquire(5, "k", Mode.X)
    assert t.acquire(1, "k", Mode.X) is WAIT
    assert t.cancel(1, "k") == []
    assert t.release_all(5) == []
    assert t.holders("k") == {}


ops = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release"]),
        st.integers(1, 6),  # txid
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from([Mode.S, Mode.X, Mode.IX]),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_random_schedules_never_deadlock_and_stay_consistent(
    schedule: list[tuple[str, int, str, Mode]],
) -> None:
    t = LockTable()
    waiting: dict[int, str] = {}  # txid -> resource it waits for (a tx waits on one at a time)
    dead: set[int] = set()
    for op, txid, resource, mode in schedule:
        if txid in dead:
            continue
        if op == "release":
            if txid in waiting:
                continue
            for request in t.release_all(txid):
                waiting.pop(request.txid, None)
            continue
        if txid in waiting:
            continue  # blocked transactions issue nothing
        outcome = t.acquire(txid, resource, mode)
        if outcome is WAIT:
            waiting[txid] = resource
        elif outcome is DIE:
            for request in t.release_all(txid):
                waiting.pop(request.txid, None)
            dead.add(txid)
        t.check_invariants()
        # Every waits-for edge goes from an older to a younger transaction: no cycles.
        graph = nx.DiGraph()
        for waiter, res in waiting.items():
            for holder in t.holders(res):
                if holder != waiter:
                    assert waiter < holder, (waiter, holder)
                    graph.add_edge(waiter, holder)
        assert nx.is_directed_acyclic_graph(graph)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 5), st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(list(Mode))), max_size=4))
def test_conflicts_says_whether_another_holder_conflicts(
    schedule: list[tuple[str, int, str, Mode]], txid: int, wanted: list[tuple[str, Mode]]
) -> None:
    """``conflicts`` (a replicated record's check) agrees with the holders it reads."""
    from coordinator._locks import compatible

    t = LockTable()
    for op, holder, resource, mode in schedule:
        if op == "release":
            t.release_all(holder)
        elif t.acquire(holder, resource, mode) is DIE:
            t.release_all(holder)
    expected = any(
        other != txid and not compatible(held, mode)
        for resource, mode in wanted
        for other, held in t.holders(resource).items()
    )
    assert t.conflicts(txid, wanted) is expected


def test_anyone_may_wait_for_a_prepared_holder() -> None:
    t = LockTable()
    assert t.acquire(1, "k", Mode.X) is GRANTED
    assert t.acquire(2, "k", Mode.X) is DIE  # younger than an active holder
    t.mark_prepared(1)
    assert t.acquire(2, "k", Mode.X) is WAIT  # a prepared holder never waits: safe to wait for it
    assert [r.txid for r in t.release_all(1)] == [2]
