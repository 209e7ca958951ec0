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
from typing import Protocol, TypeVar, TypeVarTuple, Unpack

import trio

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

class SimulatedNode(Protocol):
    #: Set when the simulator crashed the node: it may not touch its storage any more.
    crashed: bool

    def storage_delay_s(self) -> float:
        """How long the next blocking storage call waits first (a slow disk; 0: none)."""
        ...


class NodeCrashed(BaseException):
    """Raised to code of a simulated node that keeps running after the node crashed
    (e.g. a step shielded from cancellation): a crashed process writes nothing more.
    A ``BaseException``, like ``trio.Cancelled``, so ``except Exception`` does not eat it."""


#: The simulated node the current task belongs to (``None`` in production).
inline: contextvars.ContextVar[SimulatedNode | None] = contextvars.ContextVar("txrpc_storage_inline", default=None)


async def run_blocking(
    fn: Callable[[Unpack[Ts]], T], *args: *Ts, limiter: trio.CapacityLimiter | None = None
) -> T:
    """``fn(*args)`` on a worker thread (bounded by ``limiter``), or inline under simulation."""
    node = inline.get()
    if node is not None:
        if node.crashed:
            raise NodeCrashed("this simulated node crashed; its storage is gone for it")
        await trio.lowlevel.checkpoint_if_cancelled()
        delay_s = node.storage_delay_s()
        if delay_s > 0:
            # A slow disk: the call starts later (other tasks run meanwhile), as a write
            # queued behind a slow fsync would; nothing of it has happened yet.
            await trio.sleep(delay_s)
            if node.crashed:
                raise NodeCrashed("this simulated node crashed; its storage is gone for it")
        result = fn(*args)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return result
    return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
