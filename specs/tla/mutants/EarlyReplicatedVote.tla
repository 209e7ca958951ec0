-------------------------- MODULE EarlyReplicatedVote --------------------------
(* MUTANT: the primary votes yes before every follower of its epoch holds   *)
(* the prepare record: a commit then depends on one machine.               *)
(* Caught by: NoLostCommit.                                                 *)
EXTENDS Replication

VoteEarly(t) ==
    LET p == txNode[t] IN
    /\ p # NoNode
    /\ rec[p][t] = "active"
    /\ rec' = [rec EXCEPT ![p][t] = "prepared"]
    /\ voted' = [voted EXCEPT ![t] = TRUE]
    /\ UNCHANGED <<epoch, members, nEpoch, log, readVer, txNode, txEpoch, dec>>

MutantSpec == Init /\ [][Next \/ \E t \in Tx : VoteEarly(t)]_vars
=============================================================================
