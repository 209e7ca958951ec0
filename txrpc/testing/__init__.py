"""Fault-injection testing for txrpc and for services built on it.

* :func:`simulate` / :class:`Simulation`: a whole cluster (coordinator, shards,
  clients) in one ``trio.run`` on a ``MockClock``, running the production code over
  an in-memory :class:`SimNetwork` with per-link and per-node faults; one seed
  replays a run exactly.
* :func:`run_simulation`: a workload (bank, list-append, idempotency) under a
  schedule of :class:`Fault` steps, checked; :func:`fault_schedules` generates
  schedules with Hypothesis.
* :class:`History` and the checkers: bank, Elle-style list-append, idempotency,
  termination, replica consistency.

* :class:`FaultProxy` (a Toxiproxy-like TCP proxy) and :func:`run_chaos` (``txrpc
  chaos``): real processes under faults.

See ``docs/testing-under-faults.md`` and ``docs/chaos.md``.
"""

from ._checkers import (
    Anomaly,
    CheckResult,
    check_bank,
    check_idempotency,
    check_list_append,
    check_replica_consistency,
    check_termination,
)
from ._history import History, Op, Pending
from ._network import LinkFaults, SimNetwork, SimStream
from ._proxy import FaultProxy, ProxyStats, Toxics, open_fault_proxy
from ._runner import FAULT_KINDS, WORKLOADS, Fault, SimResult, apply_fault, fault_schedules, run_simulation
from ._sim import BROKEN_SWITCHES, COORDINATOR, SimNode, SimOptions, Simulation, replay_hint, simulate
from ._workloads import WorkloadOptions, bank_service, counter_service, list_append_service

__all__ = [
    "BROKEN_SWITCHES",
    "COORDINATOR",
    "FAULT_KINDS",
    "WORKLOADS",
    "Anomaly",
    "CheckResult",
    "ChaosOptions",
    "Fault",
    "FaultProxy",
    "History",
    "LinkFaults",
    "Op",
    "Pending",
    "ProxyStats",
    "SimNetwork",
    "SimNode",
    "SimOptions",
    "SimResult",
    "SimStream",
    "Simulation",
    "Toxics",
    "WorkloadOptions",
    "apply_fault",
    "bank_service",
    "check_bank",
    "check_idempotency",
    "check_list_append",
    "check_replica_consistency",
    "check_termination",
    "counter_service",
    "fault_schedules",
    "list_append_service",
    "open_fault_proxy",
    "replay_hint",
    "run_chaos",
    "run_simulation",
    "simulate",
]


def __getattr__(name: str) -> object:
    # The chaos runner pulls in process management; import it only when asked for.
    if name in ("run_chaos", "ChaosOptions"):
        from . import _chaos

        return getattr(_chaos, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
