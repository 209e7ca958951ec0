"""Pieces shared by the batched protocol messages (``tx.prepare_many`` from the
coordinator, ``repl.prepare_many`` from a primary): answers collected per party, and
running a handful of calls at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Answers(Generic[T]):
    """One item's answers from several parties (a transaction's participants, a record's
    followers) as they arrive; the first answer of a party counts, later ones are
    ignored. ``complete`` is set when every party answered."""

    __slots__ = ("answers", "complete", "missing")

    def __init__(self, parties: int) -> None:
        self.answers: dict[str, T] = {}
        self.missing = parties
        self.complete = trio.Event()

    def put(self, party: str, answer: T) -> None:
        if party in self.answers:
            return
        self.answers[party] = answer
        self.missing -= 1
        if self.missing == 0:
            self.complete.set()


async def run_all(calls: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run ``calls`` concurrently (one alone needs no nursery). They must not raise."""
    if len(calls) == 1:
        await calls[0]()
        return
    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(call)
