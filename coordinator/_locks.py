"""Strict two-phase locking with wait-die, without I/O.

A :class:`LockTable` answers a lock request at once with :data:`GRANTED`,
:data:`WAIT` or :data:`DIE`, and :meth:`LockTable.release_all` returns the waiting
requests that became granted. The trio driver parks waiters and wakes the granted ones.

Wait-die: transactions are ordered by age (the txid of their first attempt, then the
txid; smaller = older). A request that conflicts waits
only if its transaction is older than every conflicting holder and every conflicting
request queued ahead of it -- or the younger holder is *prepared*; otherwise it dies.
Waits go from older to younger, or to a prepared transaction, which never waits again;
so the waits-for graph has no cycle: no deadlock, ever.

Modes: ``S`` (shared) and ``X`` (exclusive) on keys; the shard-wide ``SCAN`` resource
is locked ``S`` by prefix scans and ``IX`` (intention-exclusive) by every writer, so a
scan and a concurrent writer on the same shard conflict (phantom protection).
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Iterable
from typing import Any


class Mode(enum.Enum):
    S = "S"
    X = "X"
    IX = "IX"


# compatible[(held, requested)]
_COMPATIBLE = {
    (Mode.S, Mode.S): True,
    (Mode.S, Mode.X): False,
    (Mode.S, Mode.IX): False,
    (Mode.X, Mode.S): False,
    (Mode.X, Mode.X): False,
    (Mode.X, Mode.IX): False,
    (Mode.IX, Mode.S): False,
    (Mode.IX, Mode.X): False,
    (Mode.IX, Mode.IX): True,
}



def compatible(held: Mode, requested: Mode) -> bool:
    """May ``requested`` be granted while another transaction holds ``held``?"""
    return _COMPATIBLE[(held, requested)]


# The stronger of two modes a transaction holds on one resource.
_STRENGTH = {Mode.S: 1, Mode.IX: 1, Mode.X: 2}

SCAN_RESOURCE: tuple[str, Any] = ("scan", None)


class Outcome(enum.Enum):
    GRANTED = "granted"
    WAIT = "wait"
    DIE = "die"


GRANTED = Outcome.GRANTED
WAIT = Outcome.WAIT
DIE = Outcome.DIE


@dataclasses.dataclass(slots=True)
class Request:
    txid: int
    resource: Any
    mode: Mode


@dataclasses.dataclass(slots=True)
class _Entry:
    holders: dict[int, Mode] = dataclasses.field(default_factory=dict)
    queue: deque[Request] = dataclasses.field(default_factory=deque)
    #: Holders whose mode is not IX: while 0, an IX request meets no conflicting holder
    #: (every writer takes IX on the shard's SCAN resource, so it has many holders).
    not_ix: int = 0


def _combined(a: Mode, b: Mode) -> Mode:
    if a == b:
        return a
    if Mode.X in (a, b) or {a, b} == {Mode.S, Mode.IX}:
        return Mode.X  # S + IX on one resource is as strong as X for our purposes
    return a if _STRENGTH[a] >= _STRENGTH[b] else b


class LockTable:
    """Locks of one shard. Not thread-safe; one event loop owns it."""

    def __init__(self) -> None:
        self._entries: dict[Any, _Entry] = {}
        self._held: dict[int, dict[Any, Mode]] = {}
        self._prepared: set[int] = set()
        self._age: dict[int, int] = {}
        self._queued: dict[int, set[Any]] = {}  # txid -> resources where it has a queued request

    def copy(self) -> LockTable:
        """An independent copy (the exhaustive state-machine tests branch on it)."""
        new = LockTable()
        new._entries = {r: _Entry(dict(e.holders), deque(e.queue), e.not_ix) for r, e in self._entries.items()}
        new._held = {t: dict(m) for t, m in self._held.items()}
        new._prepared = set(self._prepared)
        new._age = dict(self._age)
        new._queued = {t: set(r) for t, r in self._queued.items()}
        return new

    def set_age(self, txid: int, age: int) -> None:
        """Order ``txid`` by ``age`` (the txid of its first attempt) for wait-die, so a
        retried transaction keeps its seniority and cannot starve."""
        if age != txid:
            self._age[txid] = age

    def _older(self, a: int, b: int) -> bool:
        return (self._age.get(a, a), a) < (self._age.get(b, b), b)

    def mark_prepared(self, txid: int) -> None:
        """``txid`` is prepared: it will never wait for a lock again, so anyone may
        wait for it (no cycle can pass through it) instead of dying."""
        self._prepared.add(txid)

    def held_by(self, txid: int) -> dict[Any, Mode]:
        """The locks ``txid`` holds (resource → mode)."""
        return dict(self._held.get(txid, {}))

    def holders(self, resource: Any) -> dict[int, Mode]:
        entry = self._entries.get(resource)
        return dict(entry.holders) if entry else {}

    def conflicts(self, txid: int, locks: Iterable[tuple[Any, Mode]]) -> bool:
        """Does another transaction hold a lock that conflicts with one of ``locks``?
        (Queued requests do not count.) :meth:`holders` for each, without the copies."""
        entries = self._entries
        for resource, mode in locks:
            entry = entries.get(resource)
            if entry is not None:
                for other, held in entry.holders.items():
                    if other != txid and not _COMPATIBLE[(held, mode)]:
                        return True
        return False

    def waiting(self) -> int:
        return sum(len(e.queue) for e in self._entries.values())

    def acquire(self, txid: int, resource: Any, mode: Mode) -> Outcome:
        """Ask for ``mode`` on ``resource``. WAIT means the request is queued: the
        driver waits until :meth:`release_all` returns it (or gives up with
        :meth:`cancel`)."""
        if self.acquire_if_free(txid, resource, mode):
            return GRANTED
        entry = self._entries[resource]
        held = entry.holders.get(txid)
        wanted = mode if held is None else _combined(held, mode)
        conflicts = [
            other
            for other, other_mode in entry.holders.items()
            if other != txid and not _COMPATIBLE[(other_mode, wanted)]
        ]
        # Requests queued ahead that conflict with us (FIFO fairness: no overtaking),
        # except upgrades, which go first (they already hold the resource).
        if held is None:
            conflicts += [r.txid for r in entry.queue if r.txid != txid and not _COMPATIBLE[(r.mode, wanted)]]
        if not conflicts:
            self._grant(entry, txid, resource, wanted)
            return GRANTED
        if all(self._older(txid, other) or other in self._prepared for other in conflicts):
            request = Request(txid, resource, wanted)
            if held is not None:
                entry.queue.appendleft(request)
            else:
                entry.queue.append(request)
            self._queued.setdefault(txid, set()).add(resource)
            return WAIT
        if not entry.holders and not entry.queue:
            del self._entries[resource]
        return DIE

    def acquire_if_free(self, txid: int, resource: Any, mode: Mode) -> bool:
        """Grant ``mode`` if that needs no look at other transactions: nobody holds or
        waits for ``resource``, ``txid`` already holds it strongly enough, or it is IX
        among IX holders only with no one queued. False: nothing changed (ask
        :meth:`acquire`, which decides grant, wait or die)."""
        entry = self._entries.get(resource)
        if entry is None:  # the usual key
            entry = self._entries[resource] = _Entry()
            self._grant(entry, txid, resource, mode)
            return True
        held = entry.holders.get(txid)
        wanted = mode if held is None else _combined(held, mode)
        if held is not None and wanted == held:
            return True  # already strong enough
        if wanted is Mode.IX and not entry.not_ix and not entry.queue:
            self._grant(entry, txid, resource, wanted)  # (every writer's on the SCAN resource)
            return True
        return False

    def _grant(self, entry: _Entry, txid: int, resource: Any, mode: Mode) -> None:
        before = entry.holders.get(txid)
        entry.not_ix += (mode is not Mode.IX) - (before is not None and before is not Mode.IX)
        entry.holders[txid] = mode
        self._held.setdefault(txid, {})[resource] = mode

    def cancel(self, txid: int, resource: Any) -> list[Request]:
        """Withdraw a queued request of ``txid`` (timeout, cancel). Returns newly granted requests."""
        entry = self._entries.get(resource)
        if entry is None:
            return []
        entry.queue = deque(r for r in entry.queue if r.txid != txid)
        self._unqueued(txid, resource)
        return self._drain(resource, entry)

    def _unqueued(self, txid: int, resource: Any) -> None:
        """``txid`` has no queued request on ``resource`` any more."""
        queued = self._queued.get(txid)
        if queued is not None:
            queued.discard(resource)
            if not queued:
                del self._queued[txid]

    def release_all(self, txid: int) -> list[Request]:
        """Release every lock and queued request of ``txid``; return the requests
        (of other transactions) granted as a result, in grant order."""
        granted: list[Request] = []
        self._prepared.discard(txid)
        self._age.pop(txid, None)
        resources = list(self._held.pop(txid, {}))
        for resource in self._queued.pop(txid, ()):
            entry = self._entries.get(resource)
            if entry is not None:
                entry.queue = deque(r for r in entry.queue if r.txid != txid)
                if resource not in resources:
                    resources.append(resource)
        for resource in resources:
            found = self._entries.get(resource)
            if found is None:
                continue
            before = found.holders.pop(txid, None)
            if before is not None and before is not Mode.IX:
                found.not_ix -= 1
            granted += self._drain(resource, found)
        return granted

    def _drain(self, resource: Any, entry: _Entry) -> list[Request]:
        granted: list[Request] = []
        while entry.queue:
            request = entry.queue[0]
            # What the transaction will hold: with two operations of one transaction
            # queued on the resource, the second must not weaken what the first got.
            held = entry.holders.get(request.txid)
            wanted = request.mode if held is None else _combined(held, request.mode)
            if any(
                other != request.txid and not _COMPATIBLE[(mode, wanted)] for other, mode in entry.holders.items()
            ):
                break
            entry.queue.popleft()
            if not any(r.txid == request.txid for r in entry.queue):
                self._unqueued(request.txid, resource)
            self._grant(entry, request.txid, resource, wanted)
            granted.append(request)
        if not entry.holders and not entry.queue:
            del self._entries[resource]
        return granted

    def check_invariants(self) -> None:
        """Assert the table is consistent (used by tests and the simulator)."""
        for resource, entry in self._entries.items():
            assert entry.not_ix == sum(m is not Mode.IX for m in entry.holders.values()), f"{resource}: not_ix"
            modes = list(entry.holders.items())
            for i, (a, ma) in enumerate(modes):
                for b, mb in modes[i + 1 :]:
                    assert _COMPATIBLE[(ma, mb)], f"{resource}: {a}:{ma} and {b}:{mb} both held"
                assert self._held[a][resource] == ma
        queued = {(r.txid, resource) for resource, entry in self._entries.items() for r in entry.queue}
        indexed = {(txid, resource) for txid, resources in self._queued.items() for resource in resources}
        assert queued == indexed, f"queued requests {queued} but indexed {indexed}"
