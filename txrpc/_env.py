"""The world the production code runs in: network, wall clock, fault points.

Protocol code never opens a socket, reads the wall clock or decides to fail on its
own; it asks this module. In production (no environment installed) the answers are
the real ones: TCP via trio, ``time.time``, and every fault point inert. The
deterministic simulator (:mod:`txrpc.testing`) installs an :class:`Environment` per
simulated node, in a context variable that the node's tasks inherit, so one
``trio.run`` can hold a whole cluster whose nodes talk over an in-memory network
with faults — running the same code as production. (FoundationDB's ``g_network``
and ``BUGGIFY`` are the model.)

The simulator also switches storage to run inline in the trio thread (no worker
threads, so a run is deterministic): see ``storage._threads``.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any, Protocol

import trio


class Environment(Protocol):
    """What a node can ask of the world. Implemented by the simulator."""

    #: The node's name (for logs and per-link faults).
    node: str

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream: ...

    async def open_listeners(self, host: str, port: int) -> list[trio.abc.Listener[Any]]: ...

    def wall_time(self) -> float: ...

    def buggify(self, name: str) -> bool: ...

    def crash_point(self, name: str) -> None: ...

    def broken(self, name: str) -> bool: ...


#: The environment of the current task; ``None`` in production.
current: contextvars.ContextVar[Environment | None] = contextvars.ContextVar("txrpc_env", default=None)


async def open_stream(host: str, port: int) -> trio.abc.Stream:
    """A byte stream to ``host:port`` (TCP in production)."""
    env = current.get()
    if env is None:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        return stream
    return await env.open_stream(host, port)


async def open_listeners(host: str, port: int) -> list[trio.abc.Listener[Any]]:
    """Listeners on ``host:port`` (TCP in production; ``port=0`` picks one)."""
    env = current.get()
    if env is None:
        return list(await trio.open_tcp_listeners(port, host=host))
    return await env.open_listeners(host, port)


def wall_time() -> float:
    """Seconds since the epoch that survive restarts (``time.time`` in production)."""
    env = current.get()
    return time.time() if env is None else env.wall_time()


def buggify(name: str) -> bool:
    """True when the simulator wants the rare path named ``name`` taken; always False
    in production. Use at protocol edges: ``if buggify("x"): await trio.sleep(…)``."""
    env = current.get()
    return False if env is None else env.buggify(name)


def crash_point(name: str) -> None:
    """Let the simulator crash this node here (it cancels the node; the next
    checkpoint raises ``Cancelled``). Inert in production, where
    ``coordinator._faults`` handles ``TXRPC_CRASH_AT``."""
    env = current.get()
    if env is not None:
        env.crash_point(name)


def broken(name: str) -> bool:
    """True when the simulator turned on the test-only protocol-breaking switch
    ``name`` (to prove the checkers catch the bug it causes). Always False in production."""
    env = current.get()
    return False if env is None else env.broken(name)


def node_name() -> str:
    env = current.get()
    return "" if env is None else env.node
