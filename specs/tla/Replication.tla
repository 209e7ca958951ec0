----------------------------- MODULE Replication -----------------------------
(***************************************************************************)
(* Synchronous replication of one partition with epochs and fencing, as    *)
(* built (specs/replication.md).  Every transaction reads and writes the   *)
(* partition's one key, so any two conflict: the strongest case for        *)
(* ordering.  The coordinator's part is reduced to its durable decision   *)
(* (CommitProtocol.tla checks the two-phase commit itself).                *)
(*                                                                         *)
(*  - The authority (the coordinator) keeps the epoch and each epoch's     *)
(*    replica set durably; a mark-down makes a new epoch without a node    *)
(*    (where it was primary, the next member takes over).  Nodes install  *)
(*    a new epoch at any later time (pushed or fetched), so a deposed      *)
(*    primary may go on believing it is primary.                           *)
(*  - A node that believes it is the primary at its installed epoch runs a *)
(*    transaction under its lock: it reads the key (its log length) and     *)
(*    buffers the write.  It sends the prepare record to the followers of  *)
(*    its epoch; a follower takes it only at the same epoch (fencing) and   *)
(*    when no other record holds the key's lock there.  The primary votes  *)
(*    yes only when every follower of its epoch has the record.           *)
(*  - The decision: commit once the vote is yes, abort (presumed) while   *)
(*    it is not.  Every replica holding the record applies it when it      *)
(*    learns the decision, in any interleaving.                            *)
(*                                                                         *)
(* Invariants: the replicas of the current epoch agree on the order of    *)
(* what they applied (LogsAgree); no committed transaction is missing     *)
(* from a current replica (NoLostCommit); every applied transaction read  *)
(* exactly the transactions before it -- a deposed primary's stale read   *)
(* never commits (StaleReadNeverCommits).                                 *)
(***************************************************************************)
EXTENDS Integers, Sequences, FiniteSets

CONSTANTS Node, Tx, MaxEpoch, NoNode

VARIABLES
    epoch,      \* the authority's epoch (durable)
    members,    \* members[e]: the replica set of epoch e, primary first (durable)
    nEpoch,     \* nEpoch[n]: the epoch node n has installed
    rec,        \* rec[n][t]: "none" | "active" | "prepared" | "committed" | "aborted"
    log,        \* log[n]: the transactions n applied, in order (its commit log)
    readVer,    \* readVer[t]: the log length t read at its primary (-1: not run yet)
    txNode,     \* txNode[t]: the primary that ran t
    txEpoch,    \* txEpoch[t]: the epoch it ran at
    voted,      \* voted[t]: its primary voted yes
    dec         \* dec[t]: the coordinator's decision: "none" | "commit" | "abort"

vars == <<epoch, members, nEpoch, rec, log, readVer, txNode, txEpoch, voted, dec>>

Set(s) == {s[i] : i \in 1..Len(s)}
(* Epoch 1: every node replicates the partition (R = |Node|), in some fixed order. *)
InitMembers == CHOOSE s \in [1..Cardinality(Node) -> Node] : Set(s) = Node
Primary(e) == members[e][1]
Followers(e) == Set(members[e]) \ {Primary(e)}
Holds(n) == \E t \in Tx : rec[n][t] \in {"active", "prepared"}   \* the key's lock

Init ==
    /\ epoch = 1
    /\ members = [e \in 1..MaxEpoch |-> IF e = 1 THEN InitMembers ELSE <<>>]
    /\ nEpoch = [n \in Node |-> 1]
    /\ rec = [n \in Node |-> [t \in Tx |-> "none"]]
    /\ log = [n \in Node |-> <<>>]
    /\ readVer = [t \in Tx |-> -1]
    /\ txNode = [t \in Tx |-> NoNode]
    /\ txEpoch = [t \in Tx |-> 0]
    /\ voted = [t \in Tx |-> FALSE]
    /\ dec = [t \in Tx |-> "none"]

(* Participant.operation: n believes it is primary; runs t under the key's lock. *)
Run(n, t) ==
    /\ readVer[t] = -1
    /\ n = Primary(nEpoch[n])
    /\ ~Holds(n)
    /\ rec' = [rec EXCEPT ![n][t] = "active"]
    /\ readVer' = [readVer EXCEPT ![t] = Len(log[n])]
    /\ txNode' = [txNode EXCEPT ![t] = n]
    /\ txEpoch' = [txEpoch EXCEPT ![t] = nEpoch[n]]
    /\ UNCHANGED <<epoch, members, nEpoch, log, voted, dec>>

(* Participant._repl_prepare at follower f: fenced by epoch, ordered by the lock. *)
AcceptPrepare(f, t) ==
    /\ txNode[t] # NoNode
    /\ rec[txNode[t]][t] = "active"
    /\ f \in Followers(txEpoch[t])
    /\ nEpoch[f] = txEpoch[t]          \* fencing: an older (or newer) epoch is refused
    /\ rec[f][t] = "none"
    /\ ~Holds(f)                       \* an earlier record's outcome comes first
    /\ rec' = [rec EXCEPT ![f][t] = "prepared"]
    /\ UNCHANGED <<epoch, members, nEpoch, log, readVer, txNode, txEpoch, voted, dec>>

(* Participant.prepare: yes only when every follower of its epoch holds the record. *)
VoteYes(t) ==
    LET p == txNode[t] IN
    /\ p # NoNode
    /\ rec[p][t] = "active"
    /\ \A f \in Followers(txEpoch[t]) : rec[f][t] = "prepared"
    /\ rec' = [rec EXCEPT ![p][t] = "prepared"]
    /\ voted' = [voted EXCEPT ![t] = TRUE]
    /\ UNCHANGED <<epoch, members, nEpoch, log, readVer, txNode, txEpoch, dec>>

(* Coordinator: the durable decision (commit only after the yes vote; presumed abort). *)
DecideCommit(t) ==
    /\ dec[t] = "none"
    /\ voted[t]
    /\ dec' = [dec EXCEPT ![t] = "commit"]
    /\ UNCHANGED <<epoch, members, nEpoch, rec, log, readVer, txNode, txEpoch, voted>>

DecideAbort(t) ==
    /\ dec[t] = "none"
    /\ readVer[t] # -1
    /\ ~voted[t]
    /\ dec' = [dec EXCEPT ![t] = "abort"]
    /\ UNCHANGED <<epoch, members, nEpoch, rec, log, readVer, txNode, txEpoch, voted>>

(* Participant._apply (primary, repl.commit at a follower, or the termination protocol). *)
Apply(n, t) ==
    /\ rec[n][t] = "prepared"
    /\ dec[t] = "commit"
    /\ rec' = [rec EXCEPT ![n][t] = "committed"]
    /\ log' = [log EXCEPT ![n] = Append(log[n], t)]
    /\ UNCHANGED <<epoch, members, nEpoch, readVer, txNode, txEpoch, voted, dec>>

(* Participant.abort / repl.abort / the termination protocol learning abort. *)
Abort(n, t) ==
    /\ rec[n][t] \in {"active", "prepared"}
    /\ dec[t] = "abort"
    /\ rec' = [rec EXCEPT ![n][t] = "aborted"]
    /\ UNCHANGED <<epoch, members, nEpoch, log, readVer, txNode, txEpoch, voted, dec>>

(* Coordinator.mark_down: a new epoch without n (ShardMap.without_replica). *)
MarkDown(n) ==
    /\ epoch < MaxEpoch
    /\ n \in Set(members[epoch])
    /\ Len(members[epoch]) > 1
    /\ epoch' = epoch + 1
    /\ members' = [members EXCEPT ![epoch + 1] = SelectSeq(members[epoch], LAMBDA m : m # n)]
    /\ UNCHANGED <<nEpoch, rec, log, readVer, txNode, txEpoch, voted, dec>>

(* Coordinator._publish / Replication.refresh: a node installs the current epoch, late. *)
Install(n) ==
    /\ nEpoch[n] < epoch
    /\ nEpoch' = [nEpoch EXCEPT ![n] = epoch]
    /\ UNCHANGED <<epoch, members, rec, log, readVer, txNode, txEpoch, voted, dec>>

Next ==
    \/ \E n \in Node, t \in Tx : Run(n, t) \/ AcceptPrepare(n, t) \/ Apply(n, t) \/ Abort(n, t)
    \/ \E t \in Tx : VoteYes(t) \/ DecideCommit(t) \/ DecideAbort(t)
    \/ \E n \in Node : MarkDown(n) \/ Install(n)

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
TypeOK ==
    /\ epoch \in 1..MaxEpoch
    /\ nEpoch \in [Node -> 1..MaxEpoch]
    /\ rec \in [Node -> [Tx -> {"none", "active", "prepared", "committed", "aborted"}]]
    /\ dec \in [Tx -> {"none", "commit", "abort"}]
    /\ voted \in [Tx -> BOOLEAN]

Current == Set(members[epoch])
IsPrefix(a, b) == Len(a) <= Len(b) /\ \A i \in 1..Len(a) : a[i] = b[i]

(* Every replica of the current epoch applied the same transactions in the same order. *)
LogsAgree == \A m, n \in Current : IsPrefix(log[m], log[n]) \/ IsPrefix(log[n], log[m])

(* A committed transaction is held (prepared or applied) by every current replica. *)
NoLostCommit ==
    \A t \in Tx : dec[t] = "commit" => \A n \in Current : rec[n][t] \in {"prepared", "committed"}

(* Serializability of the one key: each applied transaction read exactly the ones
   applied before it -- so no stale read (e.g. a deposed primary's) ever commits. *)
StaleReadNeverCommits == \A n \in Node : \A i \in 1..Len(log[n]) : readVer[log[n][i]] = i - 1

(* Only the yes vote of a primary whose every follower had the record commits. *)
CommitNeedsAllReplicas ==
    \A t \in Tx : dec[t] = "commit" => \A f \in Followers(txEpoch[t]) : rec[f][t] # "none"
=============================================================================
