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

# With ``wanted``, the heap is rebuilt without the entries no longer wanted when it holds
# more than twice the entries kept at the last rebuild, plus this many.
REBUILD_SLACK = 256


class DueTimer(Generic[E]):
    """``heap`` holds entries whose first item is their time (trio clock). :meth:`push`
    adds one (waking the task for a nearer time); :meth:`run` calls ``on_due(entry,
    now)`` for each entry whose time has come, in time order.

    ``wanted(entry)``: whether an entry still matters (its wait has not ended some other
    way). Entries are not looked for when their wait ends (a search per wait); instead
    the heap is rebuilt from the wanted ones once it has grown past twice what the last
    rebuild kept (plus ``REBUILD_SLACK``): bounded, amortized O(1) per push. The task may
    then wake early, find nothing due and sleep again. Without ``wanted`` every entry
    stays until its time."""

    __slots__ = ("_kept", "heap", "scope", "wanted")

    def __init__(self, wanted: Callable[[E], bool] | None = None) -> None:
        self.heap: list[E] = []
        self.scope: trio.CancelScope | None = None  # the task's sleep, while it sleeps
        self.wanted = wanted
        self._kept = 0

    def push(self, entry: E) -> None:
        heap = self.heap
        heapq.heappush(heap, entry)
        wanted = self.wanted
        if wanted is not None and len(heap) > 2 * self._kept + REBUILD_SLACK:
            heap[:] = [e for e in heap if wanted(e)]
            heapq.heapify(heap)
            self._kept = len(heap)
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
