"""One task asleep until the earliest of a heap of times: bounded waits, alarms and
deliveries without a cancel scope (or a task) per waiter. Entering and leaving a cancel
scope costs about as much as handling a small message, so the hot paths that bound a
wait per call or per transaction use this instead."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

E = TypeVar("E", bound=tuple[Any, ...])


class DueTimer(Generic[E]):
    """``heap`` holds entries whose first item is their time (trio clock). :meth:`push`
    adds one (waking the task for a nearer time); :meth:`run` calls ``on_due(entry,
    now)`` for each entry whose time has come, in time order. The owner may rebuild
    ``heap`` in place (dropping entries no longer wanted, then ``heapq.heapify``); the
    task may then wake early, find nothing due and sleep again."""

    __slots__ = ("heap", "scope")

    def __init__(self) -> None:
        self.heap: list[E] = []
        self.scope: trio.CancelScope | None = None  # the task's sleep, while it sleeps

    def push(self, entry: E) -> None:
        heapq.heappush(self.heap, entry)
        scope = self.scope
        if scope is not None and entry[0] < scope.deadline:
            scope.deadline = entry[0]

    async def run(self, on_due: Callable[[E, float], None]) -> None:
        heap = self.heap
        try:
            while True:
                with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                    self.scope = scope
                    await trio.sleep_forever()
                self.scope = None
                now = trio.current_time()
                while heap and heap[0][0] <= now:
                    on_due(heapq.heappop(heap), now)
        finally:
            self.scope = None
