-------------------------- MODULE IdleAbortsPrepared --------------------------
(* MUTANT: the participant's idle timeout also aborts a PREPARED           *)
(* transaction (its client went quiet after commit was called).           *)
(* Caught by: Atomicity.                                                  *)
EXTENDS CommitProtocol

IdleTimeoutAny(t, p) ==
    /\ pUp[p]
    /\ pState[p][t] \in {"active", "activeW", "prepared"}   \* the bug: prepared
    /\ pState' = [pState EXCEPT ![p][t] = "none"]
    /\ abortedBy' = [abortedBy EXCEPT ![t] = @ \cup {p}]
    /\ UNCHANGED <<coordVars, pUp, clVars, msgs, faultVars, okVoters, pErr>>

MutantNext == Next \/ \E t \in Tx, p \in Part : IdleTimeoutAny(t, p)
MutantSpec == Init /\ [][MutantNext]_vars
===============================================================================
