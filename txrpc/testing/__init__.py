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

See ``docs/testing-under-faults.md``.
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
    "Fault",
    "History",
    "LinkFaults",
    "Op",
    "Pending",
    "SimNetwork",
    "SimNode",
    "SimOptions",
    "SimResult",
    "SimStream",
    "Simulation",
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
    "replay_hint",
    "run_simulation",
    "simulate",
]
