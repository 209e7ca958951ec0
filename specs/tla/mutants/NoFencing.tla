------------------------------ MODULE NoFencing ------------------------------
(* MUTANT: a follower takes a prepare record from any epoch (no fencing):   *)
(* a deposed primary that never heard of the new epoch collects its acks   *)
(* and commits a transaction that read a stale value.                      *)
(* Caught by: StaleReadNeverCommits.                                       *)
EXTENDS Replication

AcceptAnyEpoch(f, t) ==
    /\ txNode[t] # NoNode
    /\ rec[txNode[t]][t] = "active"
    /\ f \in Followers(txEpoch[t])
    /\ rec[f][t] = "none"
    /\ ~Holds(f)
    /\ rec' = [rec EXCEPT ![f][t] = "prepared"]
    /\ UNCHANGED <<epoch, members, nEpoch, log, readVer, txNode, txEpoch, voted, dec>>

MutantSpec == Init /\ [][Next \/ \E f \in Node, t \in Tx : AcceptAnyEpoch(f, t)]_vars
=============================================================================
