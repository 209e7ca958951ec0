------------------------- MODULE LateVoteFlipsDecision -------------------------
(* MUTANT: the coordinator handles a vote without checking that it is     *)
(* still PREPARING: a duplicated prepare reaches a read-only participant  *)
(* that already forgot the transaction, it votes no, and that late "no"   *)
(* turns a durable commit into an abort.                                   *)
(* Caught by: DecisionNeverChanges.                                       *)
EXTENDS CommitProtocol

LateNoVote(t, p) ==
    /\ cUp
    /\ Msg("vote", t, p, "no") \in msgs
    /\ cState[t] = "committing"                 \* the bug: not only "preparing"
    /\ cState' = [cState EXCEPT ![t] = "aborting"]
    /\ cAcks' = [cAcks EXCEPT ![t] = {}]
    /\ UNCHANGED <<cUp, cYes, cRo, nextId, dLog, dParts, idHigh, partVars, clVars,
                   msgs, faultVars, histVars>>

MutantNext == Next \/ \E t \in Tx, p \in Part : LateNoVote(t, p)
MutantSpec == Init /\ [][MutantNext]_vars
================================================================================
