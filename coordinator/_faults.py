"""Crash points for tests: ``TXRPC_CRASH_AT=name[,name…]`` makes the process SIGKILL
itself when it reaches that point (read once at import; inert otherwise). Under the
simulator (``txrpc.testing``) the same points are where it may crash a node.

Points: ``coordinator.after_decision`` (commit record durable, phase 2 not started),
``participant.after_prepare`` (prepare record durable, vote not sent),
``participant.before_commit_apply`` (commit received, not applied).
"""

from __future__ import annotations

import os
import signal

from txrpc import _env

CRASH_AT = frozenset(name for name in os.environ.get("TXRPC_CRASH_AT", "").split(",") if name)


def crash_point(name: str) -> None:
    if name in CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    _env.crash_point(name)  # under simulation: the simulator may crash the node here
