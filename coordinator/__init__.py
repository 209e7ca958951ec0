"""coordinator — the atomic-commit protocol: the coordinator service and the participant
runtime that hosts ``@service.transactional`` methods on a shard.

Sans-IO cores: :mod:`coordinator._locks` (wait-die lock table),
:mod:`coordinator._participant_core`, :mod:`coordinator._coordinator_core`.
trio drivers: :class:`Participant`, :class:`Coordinator`; processes:
:func:`run_shard`, :func:`run_coordinator`. See ``specs/commit-protocol.md``.
"""

from ._coordinator import Coordinator
from ._coordinator_core import CoordinatorCore, Decision, Phase
from ._locks import LockTable, Mode
from ._participant import Participant, TxHandle
from ._participant_core import ParticipantCore, TxState
from ._runtime import run_coordinator, run_shard

__all__ = [
    "Coordinator",
    "CoordinatorCore",
    "Decision",
    "LockTable",
    "Mode",
    "Participant",
    "ParticipantCore",
    "Phase",
    "TxHandle",
    "TxState",
    "run_coordinator",
    "run_shard",
]
