"""Fault-injection testing for txrpc and for services built on it.

* :func:`simulate` / :class:`Simulation`: a whole cluster (coordinator, shards,
  clients) in one ``trio.run`` on a ``MockClock``, running the production code over
  an in-memory :class:`SimNetwork` with per-link and per-node faults; one seed
  replays a run exactly.
* Histories and checkers (bank, Elle-style list-append, idempotency, termination,
  replica consistency).

See ``docs/testing-under-faults.md``.
"""

from ._network import LinkFaults, SimNetwork, SimStream
from ._sim import COORDINATOR, SimNode, SimOptions, Simulation, replay_hint, simulate

__all__ = [
    "COORDINATOR",
    "LinkFaults",
    "SimNetwork",
    "SimNode",
    "SimOptions",
    "SimStream",
    "Simulation",
    "replay_hint",
    "simulate",
]
