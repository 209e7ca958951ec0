------------------------- MODULE LaterOpRestartsLostTx -------------------------
(* MUTANT: a participant treats ANY operation for an unknown txid as the  *)
(* first one.  After it crashed and lost an ACTIVE transaction, the       *)
(* client's next operation silently starts a fresh one without the lost   *)
(* writes, which then prepares and commits.                               *)
(* Caught by: Atomicity (the participant's first incarnation was          *)
(* discarded, its second one committed).                                  *)
EXTENDS CommitProtocol

LaterOp(t, p) ==
    /\ clPhase[t] = "ops"
    /\ p \in clOps[t]                           \* not the first op
    /\ pUp[p]
    /\ pState[p][t] = "none"                    \* the bug: accepted, not refused
    /\ \E s \in {"active", "activeW"} : pState' = [pState EXCEPT ![p][t] = s]
    /\ UNCHANGED <<coordVars, pUp, clVars, msgs, faultVars, histVars>>

MutantNext == Next \/ \E t \in Tx, p \in Part : LaterOp(t, p)
MutantSpec == Init /\ [][MutantNext]_vars
================================================================================
