-------------------------- MODULE QueryOnlyOnRecovery --------------------------
(* MUTANT -- the design as first written in commit-protocol.md: a         *)
(* PREPARED participant asks decision(txid) only during recovery after a  *)
(* restart.  (Over-approximated: it may ask any time once it has crashed  *)
(* at least once.)  If the coordinator crashes in PREPARING it has no     *)
(* record and sends no abort, so a prepared participant that never        *)
(* restarts waits forever with its locks held -- even after every fault   *)
(* has stopped.                                                           *)
(* Caught by: Termination (liveness).                                     *)
EXTENDS CommitProtocol

PQueryAfterRestart(t, p) == PQuery(t, p) /\ pCrashes[p] > 0

MPartNext ==
    \E p \in Part :
       \/ PCrash(p) \/ PRecover(p)
       \/ \E t \in Tx : PartRecv(t, p) \/ PQueryAfterRestart(t, p) \/ PIdleTimeout(t, p)

MutantNext == ClientNext \/ CoordNext \/ MPartNext \/ NetNext

MPartFairness ==
    \A p \in Part :
       /\ WF_vars(PRecover(p))
       /\ \A t \in Tx :
            /\ WF_vars(PRecvPrepare(t, p)) /\ WF_vars(PRecvCommit(t, p))
            /\ WF_vars(PRecvAbort(t, p)) /\ WF_vars(PRecvOnePhase(t, p))
            /\ \A d \in {"commit", "abort"} : WF_vars(PRecvDecision(t, p, d))
            /\ WF_vars(PQueryAfterRestart(t, p)) /\ WF_vars(PIdleTimeout(t, p))

MutantSpec == Init /\ [][MutantNext]_vars /\ CoordFairness /\ MPartFairness
================================================================================
