------------------------------ MODULE NoIdBlock ------------------------------
(* MUTANT: the coordinator presumes abort after a crash but has no        *)
(* durable id-block rule: on restart it derives its id counter from the   *)
(* commit log (1 + the highest txid with a commit record).  A txid that   *)
(* was in flight at the crash (no record yet) is handed out again, so a   *)
(* new transaction and the old one's prepared/active participants share   *)
(* it: the old transaction is presumed aborted at one participant and     *)
(* its work committed at another under the new one.                       *)
(* Caught by: Atomicity.                                                  *)
EXTENDS CommitProtocol

MaxLogged == LET S == {t \in Tx : dLog[t] # "none"}
             IN IF S = {} THEN 0 ELSE CHOOSE m \in S : \A u \in S : u <= m

RecoverFromLogOnly ==
    /\ ~ cUp
    /\ cUp' = TRUE
    /\ cState' = [t \in Tx |-> IF dLog[t] = "commit" THEN "committing" ELSE "none"]
    /\ nextId' = MaxLogged + 1                 \* the bug: not idHigh
    /\ UNCHANGED <<cYes, cRo, cAcks, dLog, dParts, idHigh, partVars, clVars, msgs,
                   faultVars, histVars>>

MutantNext == Next \/ RecoverFromLogOnly
MutantSpec == Init /\ [][MutantNext]_vars
==============================================================================
