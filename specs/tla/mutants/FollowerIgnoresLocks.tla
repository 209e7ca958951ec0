------------------------- MODULE FollowerIgnoresLocks -------------------------
(* MUTANT: a follower takes a prepare record while an earlier record still  *)
(* holds the key's lock there: commits can then be applied in another     *)
(* order than the primary's.                                               *)
(* Caught by: LogsAgree.                                                    *)
EXTENDS Replication

AcceptDespiteLock(f, t) ==
    /\ txNode[t] # NoNode
    /\ rec[txNode[t]][t] = "active"
    /\ f \in Followers(txEpoch[t])
    /\ nEpoch[f] = txEpoch[t]
    /\ rec[f][t] = "none"
    /\ rec' = [rec EXCEPT ![f][t] = "prepared"]
    /\ UNCHANGED <<epoch, members, nEpoch, log, readVer, txNode, txEpoch, voted, dec>>

MutantSpec == Init /\ [][Next \/ \E f \in Node, t \in Tx : AcceptDespiteLock(f, t)]_vars
=============================================================================
