"""Where blocking database work runs: worker threads in production, inline under simulation.

A worker thread cannot be part of a deterministic simulation (its timing is the
operating system's, and trio's ``MockClock`` would jump while it runs), so the
simulator (:mod:`txrpc.testing`) sets :data:`inline` for the tasks of its nodes and
the storage layer then runs each blocking call directly in the trio thread. That is
also what a crash looks like to storage: a call either completed (and is durable) or
never started.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple, Unpack

import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: True in the tasks of a simulated node.
inline: contextvars.ContextVar[bool] = contextvars.ContextVar("txrpc_storage_inline", default=False)


async def run_blocking(
    fn: Callable[[Unpack[Ts]], T], *args: *Ts, limiter: trio.CapacityLimiter | None = None
) -> T:
    """``fn(*args)`` on a worker thread (bounded by ``limiter``), or inline under simulation."""
    if inline.get():
        await trio.lowlevel.checkpoint_if_cancelled()
        result = fn(*args)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
