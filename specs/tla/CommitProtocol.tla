--------------------------- MODULE CommitProtocol ---------------------------
(***************************************************************************)
(* txrpc's commit protocol (specs/commit-protocol.md), as designed:       *)
(*                                                                         *)
(*  - two-phase commit with PRESUMED ABORT: the coordinator writes only a *)
(*    durable COMMIT record, after every participant voted yes/read_only  *)
(*    and before phase 2; a txid without one is answered "abort";         *)
(*  - a durable ID BLOCK high-water mark: txids are never reused across   *)
(*    coordinator restarts;                                                *)
(*  - participants with durable PREPARE records (prepared and committed   *)
(*    survive a crash, active transactions do not);                       *)
(*  - ONE-PHASE commit when the client names a single participant;        *)
(*  - read-only voters leave after phase 1;                               *)
(*  - crash and recovery of the coordinator and of every participant;     *)
(*  - message loss, duplication and reordering;                           *)
(*  - the coordinator's deadline (ACTIVE, PREPARING -> abort) and the     *)
(*    participants' idle timeout (ACTIVE only, never PREPARED);           *)
(*  - the termination protocol: a PREPARED participant asks decision(t)   *)
(*    and never decides alone.                                            *)
(*                                                                         *)
(* Network: `msgs` is a SET of messages.  Receiving does not remove a     *)
(* message, so every message may be delivered again, at any later time   *)
(* and in any order (duplication + reordering + delay).  Loss removes it *)
(* (bounded by MaxLosses so that faults eventually stop).  A resend      *)
(* (phase-2 retry, decision-query retry, one-phase retry) is enabled     *)
(* exactly when its message is no longer in the network, i.e. was lost. *)
(*                                                                         *)
(* Locks, wait-die, the write sets and op_seq replay are not modelled:    *)
(* a participant's transaction is "active" (read only so far) or          *)
(* "activeW" (has buffered writes).  See README.md for what is left out  *)
(* and for the mapping of every action below to the code.                 *)
(*                                                                         *)
(* Extension (replication, epochs, fencing -- a later issue): a          *)
(* participant here is a shard's primary.  Messages are records, so an    *)
(* `epoch` field can be added; receive actions are the single place where *)
(* a fencing guard would go; the per-participant state is one function   *)
(* pState[p][t] that a replica set can refine.                            *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets

CONSTANTS
    Part,             \* participants (shard primaries), model values
    MaxTxId,          \* txids are 1..MaxTxId (unique, increasing)
    IdBlock,          \* txid_block_size: ids per durable id-block write
    MaxCoordCrashes,  \* crash budget of the coordinator
    MaxPartCrashes,   \* crash budget of each participant
    MaxLosses         \* how many messages the network may drop in all

ASSUME /\ Part # {}
       /\ MaxTxId \in Nat \ {0}
       /\ IdBlock \in Nat \ {0}
       /\ {MaxCoordCrashes, MaxPartCrashes, MaxLosses} \subseteq Nat

Tx == 1..MaxTxId
NoVal == "-"

(* Coordinator per-transaction states.  "none" = not in this process's   *)
(* memory (never begun here, or lost in a crash).                         *)
CStates == {"none", "active", "preparing", "onephase", "committing",
            "aborting", "doneCommit", "doneAbort"}
(* Participant per-transaction states.  An aborted (or read-only,       *)
(* finished) transaction is forgotten: "none".  "prepared" and          *)
(* "committed" are durable (prepare record; commit-log entry).            *)
PStates == {"none", "active", "activeW", "prepared", "committed"}
(* Client per-transaction states.                                         *)
ClStates == {"idle", "ops", "committing", "toldCommitted", "toldAborted"}

Msg(type, t, p, v) == [type |-> type, t |-> t, p |-> p, v |-> v]

Messages ==
       [type : {"prepare", "commit", "abort", "onePhase", "query"},
        t : Tx, p : Part, v : {NoVal}]
  \cup [type : {"vote"}, t : Tx, p : Part, v : {"yes", "no", "readOnly"}]
  \cup [type : {"ack"}, t : Tx, p : Part, v : {"commit", "abort"}]
  \cup [type : {"onePhaseReply"}, t : Tx, p : Part, v : {"committed", "aborted"}]
  \cup [type : {"decision"}, t : Tx, p : Part, v : {"commit", "abort"}]

VARIABLES
    \* coordinator, volatile (wiped by a crash)
    cUp,        \* the coordinator process is running
    cState,     \* [Tx -> CStates]
    cYes,       \* [Tx -> SUBSET Part] yes votes received
    cRo,        \* [Tx -> SUBSET Part] read_only votes received
    cAcks,      \* [Tx -> SUBSET Part] phase-2 acks received
    nextId,     \* next txid to hand out (0 while down)
    \* coordinator, durable
    dLog,       \* [Tx -> {"none", "commit", "done"}] commit record; "done" = all acked
    dParts,     \* [Tx -> SUBSET Part] the yes voters named in the commit record
    idHigh,     \* id-block high-water mark: ids below it may have been handed out
    \* participants
    pUp,        \* [Part -> BOOLEAN]
    pState,     \* [Part -> [Tx -> PStates]]
    \* clients (one per transaction)
    clPhase,    \* [Tx -> ClStates]
    txP,        \* [Tx -> SUBSET Part] the participant set the client touches
    clOps,      \* [Tx -> SUBSET Part] participants the client has sent its first op to
    \* network
    msgs,
    \* fault budget
    cCrashes, pCrashes, losses,
    \* history, only for the properties
    abortedBy,  \* [Tx -> SUBSET Part] participants that ever discarded t's work
    okVoters,   \* [Tx -> SUBSET Part] participants that ever voted yes/read_only
                \*   or committed t in one phase
    pErr        \* a participant got a commit/abort it must refuse (a protocol bug)

coordVars == <<cUp, cState, cYes, cRo, cAcks, nextId, dLog, dParts, idHigh>>
partVars  == <<pUp, pState>>
clVars    == <<clPhase, txP, clOps>>
faultVars == <<cCrashes, pCrashes, losses>>
histVars  == <<abortedBy, okVoters, pErr>>
vars == <<coordVars, partVars, clVars, msgs, faultVars, histVars>>

Send(m) == msgs' = msgs \cup {m}

-----------------------------------------------------------------------------
(* Initial state *)

Init ==
    /\ cUp = TRUE
    /\ cState = [t \in Tx |-> "none"]
    /\ cYes = [t \in Tx |-> {}]
    /\ cRo = [t \in Tx |-> {}]
    /\ cAcks = [t \in Tx |-> {}]
    /\ nextId = 1
    /\ dLog = [t \in Tx |-> "none"]
    /\ dParts = [t \in Tx |-> {}]
    /\ idHigh = 1
    /\ pUp = [p \in Part |-> TRUE]
    /\ pState = [p \in Part |-> [t \in Tx |-> "none"]]
    /\ clPhase = [t \in Tx |-> "idle"]
    /\ txP = [t \in Tx |-> {}]
    /\ clOps = [t \in Tx |-> {}]
    /\ msgs = {}
    /\ cCrashes = 0
    /\ pCrashes = [p \in Part |-> 0]
    /\ losses = 0
    /\ abortedBy = [t \in Tx |-> {}]
    /\ okVoters = [t \in Tx |-> {}]
    /\ pErr = FALSE

-----------------------------------------------------------------------------
(* Client.  Clients are not fair: one may vanish at any point.            *)

(* begin(): the coordinator hands out the next txid; when its in-memory  *)
(* id block is used up it first writes the next block durably.  The     *)
(* client picks the shards it will touch (one shard -> one-phase).       *)
Begin(P) ==
    /\ cUp
    /\ nextId <= MaxTxId
    /\ LET t == nextId IN
       /\ idHigh' = IF nextId = idHigh THEN idHigh + IdBlock ELSE idHigh
       /\ nextId' = nextId + 1
       /\ cState' = [cState EXCEPT ![t] = "active"]
       /\ clPhase' = [clPhase EXCEPT ![t] = "ops"]
       /\ txP' = [txP EXCEPT ![t] = P]
       /\ clOps' = [clOps EXCEPT ![t] = {}]
    /\ UNCHANGED <<cUp, cYes, cRo, cAcks, dLog, dParts, partVars,
                   msgs, faultVars, histVars>>

(* The client's first operation on shard p (later ones change nothing   *)
(* the model tracks, except that a first write is decided here).  An     *)
(* operation is synchronous; a participant that does not know t starts   *)
(* it only on the FIRST op -- a later op for an unknown txid (its        *)
(* ACTIVE state was lost in a crash) is refused.                         *)
ClientOp(t, p) ==
    /\ clPhase[t] = "ops"
    /\ p \in txP[t] \ clOps[t]
    /\ pUp[p]
    /\ clOps' = [clOps EXCEPT ![t] = @ \cup {p}]
    /\ IF pState[p][t] = "none"
         THEN \E s \in {"active", "activeW"} : pState' = [pState EXCEPT ![p][t] = s]
         ELSE UNCHANGED pState
    /\ UNCHANGED <<coordVars, pUp, clPhase, txP, msgs, faultVars, histVars>>

(* commit(txid, participants) at the coordinator, first call or retry.  *)
(* An unknown txid (lost in a coordinator crash) with several            *)
(* participants is presumed aborted (the reply is "aborted", see         *)
(* ClientLearn).  With ONE participant it is (re-)driven as one-phase    *)
(* commit: one-phase leaves no coordinator record, so only the           *)
(* participant knows whether it committed -- presuming abort there would *)
(* lie to the client (mutant OnePhasePresumedAbort).                     *)
ClientCommit(t) ==
    /\ clPhase[t] \in {"ops", "committing"}
    /\ cUp
    /\ clPhase' = [clPhase EXCEPT ![t] = "committing"]
    /\ \/ /\ cState[t] \in {"active", "none"}
          /\ Cardinality(txP[t]) = 1
          /\ cState' = [cState EXCEPT ![t] = "onephase"]
          /\ \E p \in txP[t] : Send(Msg("onePhase", t, p, NoVal))
       \/ /\ cState[t] = "active"
          /\ Cardinality(txP[t]) > 1
          /\ cState' = [cState EXCEPT ![t] = "preparing"]
          /\ msgs' = msgs \cup {Msg("prepare", t, p, NoVal) : p \in txP[t]}
       \/ /\ ~ (cState[t] = "active" \/ (cState[t] = "none" /\ Cardinality(txP[t]) = 1))
          /\ UNCHANGED <<cState, msgs>>
    /\ UNCHANGED <<cUp, cYes, cRo, cAcks, nextId, dLog, dParts, idHigh, partVars,
                   txP, clOps, faultVars, histVars>>

(* What the coordinator answers to commit(txid, ...) right now.          *)
Outcome(t) ==
    IF dLog[t] # "none" \/ cState[t] \in {"committing", "doneCommit"} THEN "committed"
    ELSE IF \/ cState[t] \in {"aborting", "doneAbort"}
            \/ (cState[t] = "none" /\ Cardinality(txP[t]) > 1)  \* presumed abort
         THEN "aborted"
    ELSE "pending"

(* The client receives the answer to its commit call.  (A call that times *)
(* out is OutcomeUnknown: no step; the client may retry or vanish.)       *)
ClientLearn(t) ==
    /\ clPhase[t] = "committing"
    /\ cUp
    /\ Outcome(t) # "pending"
    /\ clPhase' = [clPhase EXCEPT ![t] = IF Outcome(t) = "committed"
                                           THEN "toldCommitted" ELSE "toldAborted"]
    /\ UNCHANGED <<coordVars, partVars, txP, clOps, msgs, faultVars, histVars>>

-----------------------------------------------------------------------------
(* Coordinator *)

(* Transaction deadline (or the client's abort(txid)) while ACTIVE.       *)
(* Nothing is sent: ACTIVE participants abort on their idle timeout.      *)
CDeadline(t) ==
    /\ cUp
    /\ cState[t] = "active"
    /\ cState' = [cState EXCEPT ![t] = "doneAbort"]
    /\ UNCHANGED <<cUp, cYes, cRo, cAcks, nextId, dLog, dParts, idHigh, partVars,
                   clVars, msgs, faultVars, histVars>>

(* Enter ABORTING: send abort to every participant that did not vote     *)
(* read_only, all at once (a lost one is resent by CRetryPhase2).  With   *)
(* nobody to tell the transaction is done at once.                        *)
StartAbort(t) ==
    /\ LET targets == txP[t] \ cRo[t] IN
       IF targets = {}
         THEN /\ cState' = [cState EXCEPT ![t] = "doneAbort"]
              /\ cRo' = [cRo EXCEPT ![t] = {}]
              /\ UNCHANGED msgs
         ELSE /\ cState' = [cState EXCEPT ![t] = "aborting"]
              /\ UNCHANGED cRo
              /\ msgs' = msgs \cup {Msg("abort", t, q, NoVal) : q \in targets}
    /\ cYes' = [cYes EXCEPT ![t] = {}]
    /\ cAcks' = [cAcks EXCEPT ![t] = {}]
    /\ UNCHANGED <<dLog, dParts>>

(* Every participant voted yes or read_only: write the commit record     *)
(* durably, THEN send commit to the yes voters (all at once; a lost one  *)
(* is resent by CRetryPhase2).  All read-only: nothing to commit, no     *)
(* record, done.                                                          *)
DecideCommit(t, yes) ==
    /\ IF yes = {}
         THEN /\ cState' = [cState EXCEPT ![t] = "doneCommit"]
              /\ UNCHANGED <<dLog, dParts, msgs>>
         ELSE /\ dLog' = [dLog EXCEPT ![t] = "commit"]
              /\ dParts' = [dParts EXCEPT ![t] = yes]
              /\ cState' = [cState EXCEPT ![t] = "committing"]
              /\ msgs' = msgs \cup {Msg("commit", t, q, NoVal) : q \in yes}
    /\ cYes' = [cYes EXCEPT ![t] = {}]
    /\ cRo' = [cRo EXCEPT ![t] = {}]
    /\ cAcks' = [cAcks EXCEPT ![t] = {}]

(* A vote arrives; the first vote of each participant counts.  A "no"   *)
(* aborts; the last missing yes/read_only decides commit in the same     *)
(* step (a crash or timeout "between" them is the same as one before the *)
(* last vote arrived: votes are volatile and the vote message stays).    *)
CRecvVote(t, p, v) ==
    /\ cUp
    /\ Msg("vote", t, p, v) \in msgs
    /\ cState[t] = "preparing"
    /\ p \notin cYes[t] \cup cRo[t]
    /\ IF v = "no"
         THEN StartAbort(t)
         ELSE LET yes == IF v = "yes" THEN cYes[t] \cup {p} ELSE cYes[t]
                  ro == IF v = "readOnly" THEN cRo[t] \cup {p} ELSE cRo[t]
              IN IF yes \cup ro = txP[t]
                   THEN DecideCommit(t, yes)
                   ELSE /\ cYes' = [cYes EXCEPT ![t] = yes]
                        /\ cRo' = [cRo EXCEPT ![t] = ro]
                        /\ UNCHANGED <<cState, cAcks, dLog, dParts, msgs>>
    /\ UNCHANGED <<cUp, nextId, idHigh, partVars, clVars, faultVars, histVars>>

(* Phase 1 ran past the deadline / a participant is unreachable.          *)
CPrepareTimeout(t) ==
    /\ cUp
    /\ cState[t] = "preparing"
    /\ StartAbort(t)
    /\ UNCHANGED <<cUp, nextId, idHigh, partVars, clVars, faultVars, histVars>>

(* Participants phase 2 must reach: the yes voters named in the record,  *)
(* or, when aborting, everyone that did not vote read_only.               *)
Phase2Targets(t) ==
    IF cState[t] = "committing" THEN dParts[t] ELSE txP[t] \ cRo[t]

(* Phase-2 retry: the message is gone from the network and the target   *)
(* has not acknowledged.  (After a restart the re-driven commit messages *)
(* normally are still in the network; if lost they are resent here.)    *)
CRetryPhase2(t, p) ==
    /\ cUp
    /\ cState[t] \in {"committing", "aborting"}
    /\ p \in Phase2Targets(t) \ cAcks[t]
    /\ LET m == Msg(IF cState[t] = "committing" THEN "commit" ELSE "abort", t, p, NoVal)
       IN /\ m \notin msgs
          /\ Send(m)
    /\ UNCHANGED <<coordVars, partVars, clVars, faultVars, histVars>>

(* A phase-2 ack.  The last one finishes the transaction; a commit       *)
(* record is marked done and is no longer re-driven after a restart.    *)
CRecvAck(t, p, k) ==
    /\ cUp
    /\ Msg("ack", t, p, k) \in msgs
    /\ \/ cState[t] = "committing" /\ k = "commit"
       \/ cState[t] = "aborting" /\ k = "abort"
    /\ p \in Phase2Targets(t) \ cAcks[t]
    /\ IF Phase2Targets(t) = cAcks[t] \cup {p}
         THEN /\ cState' = [cState EXCEPT ![t] = IF k = "commit" THEN "doneCommit"
                                                                ELSE "doneAbort"]
              /\ cAcks' = [cAcks EXCEPT ![t] = {}]
              /\ cRo' = [cRo EXCEPT ![t] = {}]
              /\ dLog' = IF k = "commit" THEN [dLog EXCEPT ![t] = "done"] ELSE dLog
         ELSE /\ cAcks' = [cAcks EXCEPT ![t] = @ \cup {p}]
              /\ UNCHANGED <<cState, cRo, dLog>>
    /\ UNCHANGED <<cUp, cYes, nextId, dParts, idHigh, partVars, clVars, msgs,
                   faultVars, histVars>>

(* One-phase retry (the request is gone from the network).               *)
CSendOnePhase(t) ==
    /\ cUp
    /\ cState[t] = "onephase"
    /\ \E p \in txP[t] : /\ Msg("onePhase", t, p, NoVal) \notin msgs
                         /\ Send(Msg("onePhase", t, p, NoVal))
    /\ UNCHANGED <<coordVars, partVars, clVars, faultVars, histVars>>

CRecvOnePhaseReply(t, p, o) ==
    /\ cUp
    /\ Msg("onePhaseReply", t, p, o) \in msgs
    /\ cState[t] = "onephase"
    /\ cState' = [cState EXCEPT ![t] = IF o = "committed" THEN "doneCommit" ELSE "doneAbort"]
    /\ UNCHANGED <<cUp, cYes, cRo, cAcks, nextId, dLog, dParts, idHigh, partVars,
                   clVars, msgs, faultVars, histVars>>

(* decision(txid): the commit record, else the in-memory state, else     *)
(* presumed abort.  "pending" is no answer: the participant retries.     *)
Decision(t) ==
    IF dLog[t] # "none" \/ cState[t] = "doneCommit" THEN "commit"
    ELSE IF cState[t] \in {"none", "aborting", "doneAbort"} THEN "abort"
    ELSE "pending"

CRecvQuery(t, p) ==
    /\ cUp
    /\ Msg("query", t, p, NoVal) \in msgs
    /\ Decision(t) # "pending"
    /\ Msg("decision", t, p, Decision(t)) \notin msgs
    /\ Send(Msg("decision", t, p, Decision(t)))
    /\ UNCHANGED <<coordVars, partVars, clVars, faultVars, histVars>>

(* Crash: all volatile state is gone.  (Reduction: a crash is taken only *)
(* when it loses something -- a transaction in memory or unused ids of   *)
(* the current block.  A crash of an idle process is a pause, and a      *)
(* pause is already a behaviour: no message is ever forced to arrive.)   *)
VolatileC == nextId < idHigh \/ \E t \in Tx : cState[t] # "none"

CCrash ==
    /\ cUp
    /\ cCrashes < MaxCoordCrashes
    /\ VolatileC
    /\ cUp' = FALSE
    /\ cCrashes' = cCrashes + 1
    /\ cState' = [t \in Tx |-> "none"]
    /\ cYes' = [t \in Tx |-> {}]
    /\ cRo' = [t \in Tx |-> {}]
    /\ cAcks' = [t \in Tx |-> {}]
    /\ nextId' = 0
    /\ UNCHANGED <<dLog, dParts, idHigh, partVars, clVars, msgs, pCrashes, losses,
                   histVars>>

(* Restart: re-drive phase 2 of every commit record not yet done; hand   *)
(* out ids from the next block (ids of the old in-memory block are       *)
(* skipped, so no txid is ever reused).                                   *)
CRecover ==
    /\ ~ cUp
    /\ cUp' = TRUE
    /\ cState' = [t \in Tx |-> IF dLog[t] = "commit" THEN "committing" ELSE "none"]
    /\ nextId' = idHigh
    /\ UNCHANGED <<cYes, cRo, cAcks, dLog, dParts, idHigh, partVars, clVars, msgs,
                   faultVars, histVars>>

-----------------------------------------------------------------------------
(* Participants *)

PRecvPrepare(t, p) ==
    /\ pUp[p]
    /\ Msg("prepare", t, p, NoVal) \in msgs
    /\ CASE pState[p][t] = "activeW" ->   \* durable prepare record, then vote yes
              /\ pState' = [pState EXCEPT ![p][t] = "prepared"]
              /\ Send(Msg("vote", t, p, "yes"))
              /\ okVoters' = [okVoters EXCEPT ![t] = @ \cup {p}]
         [] pState[p][t] = "active" ->    \* read only: release, forget
              /\ pState' = [pState EXCEPT ![p][t] = "none"]
              /\ Send(Msg("vote", t, p, "readOnly"))
              /\ okVoters' = [okVoters EXCEPT ![t] = @ \cup {p}]
         [] pState[p][t] = "prepared" ->  \* repeated prepare: yes again
              /\ Send(Msg("vote", t, p, "yes"))
              /\ UNCHANGED <<pState, okVoters>>
         [] pState[p][t] = "none" ->      \* unknown / aborted
              /\ Send(Msg("vote", t, p, "no"))
              /\ UNCHANGED <<pState, okVoters>>
         [] pState[p][t] = "committed" -> \* stale duplicate: nothing to say
              UNCHANGED <<pState, msgs, okVoters>>
    /\ UNCHANGED <<coordVars, pUp, clVars, faultVars, abortedBy, pErr>>

(* Apply, append the commit-log entry, delete the prepare record: one    *)
(* local transaction.  Not PREPARED and not in the commit log: refused.  *)
PRecvCommit(t, p) ==
    /\ pUp[p]
    /\ Msg("commit", t, p, NoVal) \in msgs
    /\ IF pState[p][t] \in {"prepared", "committed"}
         THEN /\ pState' = [pState EXCEPT ![p][t] = "committed"]
              /\ Send(Msg("ack", t, p, "commit"))
              /\ UNCHANGED pErr
         ELSE /\ pErr' = TRUE
              /\ UNCHANGED <<pState, msgs>>
    /\ UNCHANGED <<coordVars, pUp, clVars, faultVars, abortedBy, okVoters>>

(* Release, delete any prepare record, ack; unknown -> ack.               *)
PRecvAbort(t, p) ==
    /\ pUp[p]
    /\ Msg("abort", t, p, NoVal) \in msgs
    /\ IF pState[p][t] = "committed"
         THEN /\ pErr' = TRUE
              /\ UNCHANGED <<pState, msgs, abortedBy>>
         ELSE /\ pState' = [pState EXCEPT ![p][t] = "none"]
              /\ abortedBy' = IF pState[p][t] = "none" THEN abortedBy
                              ELSE [abortedBy EXCEPT ![t] = @ \cup {p}]
              /\ Send(Msg("ack", t, p, "abort"))
              /\ UNCHANGED pErr
    /\ UNCHANGED <<coordVars, pUp, clVars, faultVars, okVoters>>

(* commit_one_phase: ACTIVE -> decide and apply locally; already in the   *)
(* commit log -> committed (a retry); otherwise aborted.                  *)
PRecvOnePhase(t, p) ==
    /\ pUp[p]
    /\ Msg("onePhase", t, p, NoVal) \in msgs
    /\ IF pState[p][t] \in {"active", "activeW"}
         THEN /\ pState' = [pState EXCEPT ![p][t] = "committed"]
              /\ okVoters' = [okVoters EXCEPT ![t] = @ \cup {p}]
              /\ Send(Msg("onePhaseReply", t, p, "committed"))
         ELSE /\ Send(Msg("onePhaseReply", t, p,
                          IF pState[p][t] = "committed" THEN "committed" ELSE "aborted"))
              /\ UNCHANGED <<pState, okVoters>>
    /\ UNCHANGED <<coordVars, pUp, clVars, faultVars, abortedBy, pErr>>

(* The termination protocol: a PREPARED participant asks the coordinator  *)
(* -- after a restart, and whenever it has waited too long -- and retries *)
(* (the query is gone from the network).  It never decides alone.          *)
PQuery(t, p) ==
    /\ pUp[p]
    /\ pState[p][t] = "prepared"
    /\ Msg("query", t, p, NoVal) \notin msgs
    /\ Send(Msg("query", t, p, NoVal))
    /\ UNCHANGED <<coordVars, partVars, clVars, faultVars, histVars>>

PRecvDecision(t, p, d) ==
    /\ pUp[p]
    /\ Msg("decision", t, p, d) \in msgs
    /\ CASE pState[p][t] = "prepared" ->
              /\ pState' = [pState EXCEPT ![p][t] = IF d = "commit" THEN "committed"
                                                                     ELSE "none"]
              /\ abortedBy' = IF d = "abort" THEN [abortedBy EXCEPT ![t] = @ \cup {p}]
                                             ELSE abortedBy
              /\ UNCHANGED pErr
         [] pState[p][t] = "committed" ->  \* late answer; abort here would be a bug
              /\ pErr' = (pErr \/ d = "abort")
              /\ UNCHANGED <<pState, abortedBy>>
         [] OTHER ->                          \* late answer to an old query
              /\ pErr' = (pErr \/ d = "commit")
              /\ UNCHANGED <<pState, abortedBy>>
    /\ UNCHANGED <<coordVars, pUp, clVars, msgs, faultVars, okVoters>>

(* Idle timeout: only an ACTIVE (unprepared) transaction.                 *)
PIdleTimeout(t, p) ==
    /\ pUp[p]
    /\ pState[p][t] \in {"active", "activeW"}
    /\ pState' = [pState EXCEPT ![p][t] = "none"]
    /\ abortedBy' = [abortedBy EXCEPT ![t] = @ \cup {p}]
    /\ UNCHANGED <<coordVars, pUp, clVars, msgs, faultVars, okVoters, pErr>>

(* Crash: ACTIVE transactions are lost (their work is discarded);         *)
(* prepare records and the commit log survive.  (Reduction as for CCrash: *)
(* only a crash that loses an ACTIVE transaction differs from a pause.)   *)
VolatileP(p) == \E t \in Tx : pState[p][t] \in {"active", "activeW"}

PCrash(p) ==
    /\ pUp[p]
    /\ pCrashes[p] < MaxPartCrashes
    /\ VolatileP(p)
    /\ pUp' = [pUp EXCEPT ![p] = FALSE]
    /\ pCrashes' = [pCrashes EXCEPT ![p] = @ + 1]
    /\ pState' = [pState EXCEPT ![p] = [t \in Tx |->
                     IF pState[p][t] \in {"active", "activeW"} THEN "none" ELSE pState[p][t]]]
    /\ abortedBy' = [t \in Tx |-> IF pState[p][t] \in {"active", "activeW"}
                                    THEN abortedBy[t] \cup {p} ELSE abortedBy[t]]
    /\ UNCHANGED <<coordVars, clVars, msgs, cCrashes, losses, okVoters, pErr>>

(* Restart: load the prepare records (and re-take their locks) before     *)
(* serving; the in-doubt ones are then resolved by PQuery.                *)
PRecover(p) ==
    /\ ~ pUp[p]
    /\ pUp' = [pUp EXCEPT ![p] = TRUE]
    /\ UNCHANGED <<coordVars, pState, clVars, msgs, faultVars, histVars>>

-----------------------------------------------------------------------------
(* Network *)

Lose(m) ==
    /\ m \in msgs
    /\ losses < MaxLosses
    /\ msgs' = msgs \ {m}
    /\ losses' = losses + 1
    /\ UNCHANGED <<coordVars, partVars, clVars, cCrashes, pCrashes, histVars>>

-----------------------------------------------------------------------------
(* The next-state relation, grouped so that a variant (mutants/*.tla) can *)
(* swap one group or one action.                                          *)

ClientNext ==
    \/ \E P \in (SUBSET Part) \ {{}} : Begin(P)
    \/ \E t \in Tx : \/ ClientCommit(t) \/ ClientLearn(t)
                     \/ \E p \in Part : ClientOp(t, p)

CoordNext ==
    \/ CCrash \/ CRecover
    \/ \E t \in Tx :
         \/ CDeadline(t) \/ CPrepareTimeout(t) \/ CSendOnePhase(t)
         \/ \E p \in Part :
              \/ CRetryPhase2(t, p) \/ CRecvQuery(t, p)
              \/ \E v \in {"yes", "no", "readOnly"} : CRecvVote(t, p, v)
              \/ \E k \in {"commit", "abort"} : CRecvAck(t, p, k)
              \/ \E o \in {"committed", "aborted"} : CRecvOnePhaseReply(t, p, o)

PartRecv(t, p) ==
    \/ PRecvPrepare(t, p) \/ PRecvCommit(t, p) \/ PRecvAbort(t, p)
    \/ PRecvOnePhase(t, p)
    \/ \E d \in {"commit", "abort"} : PRecvDecision(t, p, d)

PartNext ==
    \E p \in Part :
       \/ PCrash(p) \/ PRecover(p)
       \/ \E t \in Tx : PartRecv(t, p) \/ PQuery(t, p) \/ PIdleTimeout(t, p)

NetNext == \E m \in msgs : Lose(m)

Next == ClientNext \/ CoordNext \/ PartNext \/ NetNext

(* Fairness: the processes (not the clients, not the faults) keep taking  *)
(* the steps that are enabled -- recovery, retries, receives, timeouts.   *)
CoordFairness ==
    /\ WF_vars(CRecover)
    /\ \A t \in Tx :
         /\ WF_vars(CDeadline(t)) /\ WF_vars(CPrepareTimeout(t))
         /\ WF_vars(CSendOnePhase(t))
         /\ \A p \in Part :
              /\ WF_vars(CRetryPhase2(t, p)) /\ WF_vars(CRecvQuery(t, p))
              /\ \A v \in {"yes", "no", "readOnly"} : WF_vars(CRecvVote(t, p, v))
              /\ \A k \in {"commit", "abort"} : WF_vars(CRecvAck(t, p, k))
              /\ \A o \in {"committed", "aborted"} : WF_vars(CRecvOnePhaseReply(t, p, o))

PartFairness ==
    \A p \in Part :
       /\ WF_vars(PRecover(p))
       /\ \A t \in Tx :
            /\ WF_vars(PRecvPrepare(t, p)) /\ WF_vars(PRecvCommit(t, p))
            /\ WF_vars(PRecvAbort(t, p)) /\ WF_vars(PRecvOnePhase(t, p))
            /\ \A d \in {"commit", "abort"} : WF_vars(PRecvDecision(t, p, d))
            /\ WF_vars(PQuery(t, p)) /\ WF_vars(PIdleTimeout(t, p))

Spec == Init /\ [][Next]_vars
FairSpec == Spec /\ CoordFairness /\ PartFairness

-----------------------------------------------------------------------------
(* Properties *)

TypeOK ==
    /\ cUp \in BOOLEAN
    /\ cState \in [Tx -> CStates]
    /\ cYes \in [Tx -> SUBSET Part] /\ cRo \in [Tx -> SUBSET Part]
    /\ cAcks \in [Tx -> SUBSET Part]
    /\ nextId \in 0..(MaxTxId + IdBlock + 1)
    /\ dLog \in [Tx -> {"none", "commit", "done"}]
    /\ dParts \in [Tx -> SUBSET Part]
    /\ idHigh \in Nat
    /\ pUp \in [Part -> BOOLEAN]
    /\ pState \in [Part -> [Tx -> PStates]]
    /\ clPhase \in [Tx -> ClStates]
    /\ txP \in [Tx -> SUBSET Part] /\ clOps \in [Tx -> SUBSET Part]
    /\ msgs \subseteq Messages
    /\ abortedBy \in [Tx -> SUBSET Part] /\ okVoters \in [Tx -> SUBSET Part]
    /\ pErr \in BOOLEAN

CommittedBy(t) == {p \in Part : pState[p][t] = "committed"}

(* No participant commits a transaction another one aborted.             *)
Atomicity == \A t \in Tx : CommittedBy(t) = {} \/ abortedBy[t] = {}

(* A commit record, or any participant's commit, only after every        *)
(* participant of the transaction voted yes/read_only (for one-phase:     *)
(* the single participant itself decided to commit).                      *)
CommitNeedsAllYes ==
    \A t \in Tx : (dLog[t] # "none" \/ CommittedBy(t) # {}) => txP[t] \subseteq okVoters[t]

(* What the client is told is what happens.                               *)
ClientOutcomeTruthful ==
    \A t \in Tx :
       /\ clPhase[t] = "toldCommitted" => abortedBy[t] = {}
       /\ clPhase[t] = "toldAborted" => CommittedBy(t) = {} /\ dLog[t] = "none"

(* Once a commit record is durable the coordinator never says abort for  *)
(* that transaction: no abort command, no abort decision, no "aborted"   *)
(* reply can exist alongside it.                                          *)
DecisionNeverChanges ==
    \A t \in Tx : dLog[t] # "none" =>
       /\ \A p \in Part : /\ Msg("abort", t, p, NoVal) \notin msgs
                          /\ Msg("decision", t, p, "abort") \notin msgs
       /\ clPhase[t] # "toldAborted"

(* ...and the durable record itself is never lost or rewritten: a        *)
(* "commit" record only becomes "done", and only once all yes voters     *)
(* acknowledged.                                                          *)
DurableDecisionKept ==
    [][\A t \in Tx :
         /\ dLog[t] # "none" => dLog'[t] # "none" /\ dParts'[t] = dParts[t]
         /\ (dLog[t] = "commit" /\ dLog'[t] = "done") =>
               dParts[t] \subseteq {p \in Part : pState[p][t] = "committed"}
      ]_vars

(* Participants never receive a commit or abort they would refuse.      *)
NoProtocolError == ~ pErr

(* Liveness: once faults stop (crash and loss budgets are finite and     *)
(* every process restarts), every transaction that was begun is decided  *)
(* everywhere: no participant is left ACTIVE or PREPARED, the            *)
(* coordinator has finished, and no commit record is left to re-drive.   *)
Resolved(t) ==
    /\ \A p \in Part : pState[p][t] \in {"none", "committed"}
    /\ cState[t] \in {"none", "doneCommit", "doneAbort"}
    /\ dLog[t] # "commit"

Termination == \A t \in Tx : clPhase[t] # "idle" ~> Resolved(t)

=============================================================================
