"""Pieces shared by the batched protocol messages (``tx.prepare_many`` from the
coordinator, ``repl.prepare_many`` from a primary): answers collected per party, and
running a handful of calls at once."""

from __future__ import annotations

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
