"""Pieces shared by the batched protocol messages (``tx.prepare_many`` from the
coordinator, ``repl.prepare_many`` from a primary): answers collected per party, and
running a handful of calls at once."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

from txrpc._timers import DueTimer

T = TypeVar("T")


class Alarms:
    """Events set at their times by one sleeping task (:meth:`run`): a wait bounded
    without a cancel scope of its own -- ``alarms.set_at(deadline, event)``, then
    ``await event.wait()``. Entering and leaving a scope costs about as much as handling
    a small message; a replicated primary bounds one wait per prepared transaction.
    An entry whose event was set by someone else stays until its time (or the next
    rebuild of the heap, :class:`~txrpc._timers.DueTimer`); setting it again then does
    nothing."""

    def __init__(self) -> None:
        self._timer = DueTimer[tuple[float, int, trio.Event]](_not_set)
        self._seq = 0
        self.running = False

    def set_at(self, deadline: float, event: trio.Event) -> None:
        self._seq += 1
        self._timer.push((deadline, self._seq, event))

    def __len__(self) -> int:
        return len(self._timer.heap)

    async def run(self) -> None:
        self.running = True
        try:
            await self._timer.run(_set_event)
        finally:
            self.running = False


def _set_event(entry: tuple[float, int, trio.Event], now: float) -> None:
    entry[2].set()


def _not_set(entry: tuple[float, int, trio.Event]) -> bool:
    return not entry[2].is_set()


class Countdown:
    """Set ``done`` when :meth:`tick` was called ``left`` times: one wait for several
    :class:`Answers` (every record of a batch acknowledged). Starts at one, the creator's
    own tick once it has added everything (so answers arriving meanwhile cannot finish
    it early)."""

    __slots__ = ("done", "left")

    def __init__(self) -> None:
        self.left = 1
        self.done = trio.Event()

    def tick(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


class Answers(Generic[T]):
    """One item's answers from several parties (a transaction's participants, a record's
    followers) as they arrive; the first answer of a party counts, later ones are
    ignored. ``complete`` is set when every party answered (and ``countdown``, if given,
    ticks once)."""

    __slots__ = ("answers", "complete", "countdown", "missing")

    def __init__(self, parties: int, countdown: Countdown | None = None) -> None:
        self.answers: dict[str, T] = {}
        self.missing = parties
        self.complete = trio.Event()
        self.countdown = countdown
        if countdown is not None:
            countdown.left += 1

    def put(self, party: str, answer: T) -> None:
        if party in self.answers:
            return
        self.answers[party] = answer
        self.missing -= 1
        if self.missing == 0:
            self.complete.set()
            if self.countdown is not None:
                self.countdown.tick()


async def run_all(calls: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``calls`` concurrently (one alone needs no nursery). They must not raise."""
    if len(calls) == 1:
        await calls[0]()
        return
    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(call)


B = TypeVar("B")


class Rounds(Generic[T, B]):
    """Items queued per destination and sent in rounds, one round per destination in
    flight at a time: with none in flight, a round leaves in the scheduler round its
    first item was queued in (no added wait); while one is unanswered, items queue and
    leave together as the next round when it is answered. So batches grow with the
    load by themselves (``tx.prepare_many`` from the coordinator, ``repl.prepare_many``
    from a primary).

    A round is ``split(items)`` into messages, each sent by ``send(dest, message,
    answered)``, all at once; each message calls ``answered()`` once its main call is
    answered or failed (what it sends again on its own afterwards does not hold the next
    round back). ``send`` must not raise. ``refuse(dest, items)`` answers items that
    cannot be sent (the nursery is closing)."""

    def __init__(
        self,
        split: Callable[[list[T]], list[B]],
        send: Callable[[str, B, Callable[[], None]], Awaitable[None]],
        refuse: Callable[[str, list[T]], None],
    ) -> None:
        self.split = split
        self.send = send
        self.refuse = refuse
        self.queued: dict[str, list[T]] = {}  # destination -> items not sent yet
        self._scheduled: set[str] = set()  # destinations whose sender task is scheduled
        self._in_flight: set[str] = set()  # destinations with a round not answered yet

    def put(self, nursery: trio.Nursery, dest: str, item: T) -> None:
        self.queued.setdefault(dest, []).append(item)
        self._schedule(nursery, dest)

    def _schedule(self, nursery: trio.Nursery, dest: str) -> None:
        if dest in self._scheduled or dest in self._in_flight or not self.queued.get(dest):
            return
        try:
            nursery.start_soon(self._round, nursery, dest)
        except RuntimeError:  # the nursery is closing: its owner is stopping
            self.refuse(dest, self.queued.pop(dest, []))
            return
        self._scheduled.add(dest)

    async def _round(self, nursery: trio.Nursery, dest: str) -> None:
        self._scheduled.discard(dest)
        items = self.queued.pop(dest, None)
        if not items:
            return
        messages = self.split(items)
        self._in_flight.add(dest)
        unanswered = [len(messages)]  # -1 once released

        def release() -> None:
            if unanswered[0] >= 0:
                unanswered[0] = -1
                self._in_flight.discard(dest)
                self._schedule(nursery, dest)

        def answered() -> None:
            unanswered[0] -= 1
            if unanswered[0] == 0:
                release()

        try:
            await run_all([functools.partial(self.send, dest, message, answered) for message in messages])
        finally:
            release()  # (however the round ended: the next one must not wait forever)
