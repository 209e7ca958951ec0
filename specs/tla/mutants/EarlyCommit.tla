----------------------------- MODULE EarlyCommit -----------------------------
(* MUTANT: the coordinator writes the commit record as soon as it has one *)
(* yes vote, before every participant has voted.                          *)
(* Caught by: CommitNeedsAllYes.                                          *)
EXTENDS CommitProtocol

EarlyDecideCommit(t) ==
    /\ cUp
    /\ cState[t] = "preparing"
    /\ cYes[t] # {}
    /\ cYes[t] \cup cRo[t] # txP[t]           \* the bug: a vote is still missing
    /\ dLog' = [dLog EXCEPT ![t] = "commit"]
    /\ dParts' = [dParts EXCEPT ![t] = cYes[t]]
    /\ cState' = [cState EXCEPT ![t] = "committing"]
    /\ cYes' = [cYes EXCEPT ![t] = {}]
    /\ cRo' = [cRo EXCEPT ![t] = {}]
    /\ cAcks' = [cAcks EXCEPT ![t] = {}]
    /\ UNCHANGED <<cUp, nextId, idHigh, partVars, clVars, msgs, faultVars, histVars>>

MutantNext == Next \/ \E t \in Tx : EarlyDecideCommit(t)
MutantSpec == Init /\ [][MutantNext]_vars
==============================================================================
