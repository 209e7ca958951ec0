------------------------- MODULE OnePhasePresumedAbort -------------------------
(* MUTANT -- the design as first written in commit-protocol.md: "Unknown  *)
(* txid -> aborted (presumed abort)" also for a ONE-PHASE transaction.    *)
(* One-phase leaves no coordinator record, so after a coordinator crash   *)
(* the client's retried commit(txid, [p]) is answered "aborted" although  *)
(* p may already have committed.                                          *)
(* Caught by: ClientOutcomeTruthful.                                      *)
EXTENDS CommitProtocol

PresumeAbortForOnePhase(t) ==
    /\ clPhase[t] = "committing"
    /\ cUp
    /\ cState[t] = "none"
    /\ dLog[t] = "none"
    /\ Cardinality(txP[t]) = 1                  \* the bug: no re-drive, presume
    /\ clPhase' = [clPhase EXCEPT ![t] = "toldAborted"]
    /\ UNCHANGED <<coordVars, partVars, txP, clOps, msgs, faultVars, histVars>>

MutantNext == Next \/ \E t \in Tx : PresumeAbortForOnePhase(t)
MutantSpec == Init /\ [][MutantNext]_vars
================================================================================
