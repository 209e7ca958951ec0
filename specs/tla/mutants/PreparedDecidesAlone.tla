------------------------- MODULE PreparedDecidesAlone -------------------------
(* MUTANT: a PREPARED participant whose decision query goes unanswered    *)
(* times out and decides alone: it voted yes, so it commits.              *)
(* Caught by: CommitNeedsAllYes (it commits although another participant *)
(* voted no).                                                             *)
EXTENDS CommitProtocol

CommitAloneOnTimeout(t, p) ==
    /\ pUp[p]
    /\ pState[p][t] = "prepared"
    /\ Msg("query", t, p, NoVal) \in msgs     \* it asked; no answer yet
    /\ Msg("decision", t, p, "commit") \notin msgs
    /\ Msg("decision", t, p, "abort") \notin msgs
    /\ pState' = [pState EXCEPT ![p][t] = "committed"]
    /\ UNCHANGED <<coordVars, pUp, clVars, msgs, faultVars, histVars>>

MutantNext == Next \/ \E t \in Tx, p \in Part : CommitAloneOnTimeout(t, p)
MutantSpec == Init /\ [][MutantNext]_vars
===============================================================================
