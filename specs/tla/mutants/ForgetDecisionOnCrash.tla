------------------------- MODULE ForgetDecisionOnCrash -------------------------
(* MUTANT: the commit decision is not really durable -- a coordinator     *)
(* crash loses it (e.g. the record was buffered but not fsynced).         *)
(* After the restart the transaction is presumed aborted.                 *)
(* Caught by: DurableDecisionKept (and, one step later, Atomicity).        *)
EXTENDS CommitProtocol

ForgetfulCrashStep ==
    /\ cUp
    /\ cCrashes < MaxCoordCrashes
    /\ \E t \in Tx : dLog[t] = "commit"
    /\ cUp' = FALSE
    /\ cCrashes' = cCrashes + 1
    /\ cState' = [t \in Tx |-> "none"]
    /\ cYes' = [t \in Tx |-> {}]
    /\ cRo' = [t \in Tx |-> {}]
    /\ cAcks' = [t \in Tx |-> {}]
    /\ nextId' = 0
    /\ dLog' = [t \in Tx |-> IF dLog[t] = "commit" THEN "none" ELSE dLog[t]]
    /\ dParts' = [t \in Tx |-> IF dLog[t] = "commit" THEN {} ELSE dParts[t]]
    /\ UNCHANGED <<idHigh, partVars, clVars, msgs, pCrashes, losses, histVars>>

MutantNext == Next \/ ForgetfulCrashStep
MutantSpec == Init /\ [][MutantNext]_vars
================================================================================
