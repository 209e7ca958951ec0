"""Transactions across shards, from the client's side: ``txrpc.cluster("cluster.toml")``.

    async with txrpc.cluster("cluster.toml") as cluster:
        async with cluster.transaction() as t:      # commits on exit, aborts on exception
            await t.bank.withdraw("alice", 10)      # routed by the first argument
            await t.bank.deposit("bob", 10)

A transaction begins at the coordinator (which hands out an ordered txid), sends each
operation straight to the primary of its key's shard carrying ``txid`` + ``op_seq`` +
the shard-map epoch, and asks the coordinator to commit on the shards it touched.
Outcomes: a normal exit means committed; :class:`~txrpc.TransactionAborted` (with the
reason and whether a retry may succeed); :class:`~txrpc.OutcomeUnknown` with the txid
when the client cannot learn the outcome in time — never reported as a failure.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trio

from ._client import Client, DeadlinePassed, connect
from ._errors import (
    Aborted,
    NotFound,
    OutcomeUnknown,
    RpcError,
    TransactionAborted,
    Unavailable,
    Unimplemented,
    WrongEpoch,
)
from ._limits import Limits
from ._routing import EPOCH_METADATA_KEY, ClusterClient
from ._security import Credentials, current_credentials
from ._shardmap import ClusterConfig, NodeSpec, ShardMap, load_cluster_config

MAP_FETCH_AT_START_S = 2.0
log = logging.getLogger("txrpc.cluster")

T = TypeVar("T")

COMMIT_GRACE_S = 10.0  # after the transaction deadline, how long commit keeps asking for the outcome
ABORT_TIMEOUT_S = 2.0  # bound on telling the coordinator we gave up

# Txid leases (``coord.lease``) adapt to the rate at which this client begins
# transactions: a lease used up in under LEASE_FAST_S makes the next one twice as big, one
# that lasted over LEASE_SLOW_S half as big. A busy client then asks a few times a second,
# not every 16 transactions -- each time with every task that wants a txid waiting for the
# round trip. Ids are not kept longer than LEASE_SLOW_S (what is left is dropped and a
# smaller lease taken): wait-die favours older ids, and an id held long would make its
# transaction look older than it is. The size is capped well below the coordinator's
# 1,000: the ids of one lease all rank older than those of any later one, another
# client's included (256 gave the whole gain of bigger leases in `txrpc bench tx`).
LEASE_SIZE_MIN = 16
LEASE_SIZE_MAX = 256
LEASE_FAST_S = 0.25
LEASE_SLOW_S = 4.0


def next_lease_size(size: int, lasted_s: float | None) -> int:
    """The size of the next txid lease after one of ``size`` ids lasted ``lasted_s``
    (None: the first lease)."""
    if lasted_s is None:
        return size
    if lasted_s < LEASE_FAST_S:
        return min(size * 2, LEASE_SIZE_MAX)
    if lasted_s > LEASE_SLOW_S:
        return max(size // 2, LEASE_SIZE_MIN)
    return size


class Cluster:
    """A client of a whole cluster: routed calls, and transactions via the coordinator."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        limits: Limits | None = None,
        rng: random.Random | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """``credentials``: what this client presents (default: the ``[security]`` table's
        client credentials when the cluster has one, else ``txrpc.use_credentials``'s)."""
        if config.coordinator is None:
            raise ValueError(f"{config.source}: transactions need a [coordinator] table")
        self.config = config
        self.limits = limits or Limits()
        self.rng = rng or random.Random(0)
        if credentials is None and config.security is not None:
            credentials = config.security.credentials_for()
        credentials = credentials or current_credentials()
        self.credentials = credentials
        cluster_limits = self.limits

        def connect_shard(host: str, port: int) -> Any:
            return connect(host, port, limits=cluster_limits, credentials=credentials)

        self.router = ClusterClient(
            config.shard_map,
            connect=connect_shard,
            map_source=self._fetch_map,
            rng=random.Random(self.rng.random()),
            credentials=credentials,
        )
        coordinator = config.coordinator
        self.coordinator: Client = connect(
            coordinator.host,
            coordinator.port,
            limits=self.limits,
            connect_now=False,
            rng=random.Random(self.rng.random()),
            credentials=credentials,
        )
        self.stats = {"committed": 0, "aborted": 0, "unknown": 0}
        self.txid_lease_size = LEASE_SIZE_MIN  # adapts: see next_lease_size
        self._leased: list[int] = []
        self._leased_at: float | None = None  # when the current lease arrived
        self._lease_timeout_s = 30.0
        self._lease_lock = trio.Lock()

    async def _next_txid(self) -> tuple[int, float]:
        """A transaction id from this client's lease (refilled from the coordinator in
        blocks sized to the rate it is used at, so beginning a transaction usually costs
        no round trip)."""
        leased_at = self._leased_at
        if self._leased and leased_at is not None and trio.current_time() - leased_at > LEASE_SLOW_S:
            self._leased.clear()  # held too long: its ids would rank older than they are
        if self._leased:  # no await in between: no other task can take it first
            return self._leased.pop(), self._lease_timeout_s
        async with self._lease_lock:
            if not self._leased:
                lasted_s = None if self._leased_at is None else trio.current_time() - self._leased_at
                size = next_lease_size(self.txid_lease_size, lasted_s)
                lease = await self.coordinator.call("coord.lease", size)
                first, count = int(lease["first"]), int(lease["count"])
                self._leased = list(range(first + count - 1, first - 1, -1))
                self._lease_timeout_s = float(lease["timeout_s"])
                self._leased_at = trio.current_time()
                self.txid_lease_size = size
            return self._leased.pop(), self._lease_timeout_s

    def _forget_lease(self) -> None:
        """Drop the ids left in the lease; the next lease is sized as a first one."""
        self._leased.clear()
        self._leased_at = None

    async def _fetch_map(self) -> ShardMap:
        """The current shard map from the coordinator (the authority); the map in use if
        the coordinator is not the authority."""
        try:
            wire = await self.coordinator.options(retries_max=0).call("coord.shard_map")
        except (NotFound, Unimplemented):
            return self.router.shard_map
        return ShardMap.from_wire(wire)

    async def replica_digests(self, skip: Iterable[str] = ()) -> tuple[ShardMap, dict[str, Any]]:
        """The authority's current map and every node's ``repl.digests`` reply (or the
        error text, for a node that did not answer); nodes in ``skip`` are not asked.
        Compare them with :func:`digest_table`."""
        shard_map = await self._fetch_map()
        replies: dict[str, Any] = {}
        for node in shard_map.nodes:
            if node.name in skip:
                continue
            try:
                client = await self.router._client_for(node)
                replies[node.name] = await client.options(timeout=30, retries_max=1).call("repl.digests")
            except RpcError as exc:
                replies[node.name] = str(exc)
        return shard_map, replies

    async def __aenter__(self) -> Cluster:
        await self.router.__aenter__()
        try:
            await self.coordinator.__aenter__()
        except BaseException:
            await self.router.__aexit__(None, None, None)
            raise
        # Start from the authority's map when it is reachable (the file's may be older,
        # or list nodes the cluster has not added yet); the file's otherwise.
        try:
            with trio.move_on_after(MAP_FETCH_AT_START_S):
                try:
                    await self.router.refresh()
                except (RpcError, OSError) as exc:
                    log.info("shard map not fetched from the coordinator: %s", exc)
        except BaseException:
            # Cancelled (or worse) while opening: close what was opened, or its task
            # groups would outlive this call (found by the simulator).
            # (Not under a shield: the task groups being closed were opened outside it.)
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.coordinator.__aexit__(None, None, None)
        finally:
            await self.router.__aexit__(None, None, None)

    def transaction(self, timeout_s: float | None = None, *, age: int | None = None) -> Transaction:
        """A new transaction (``async with``): commits when the block ends normally,
        aborts when it raises. ``timeout_s`` bounds it (the coordinator's default otherwise).
        ``age`` (the txid of an earlier attempt) keeps a retry's seniority in lock conflicts."""
        return Transaction(self, timeout_s, age)

    async def run_transaction(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        attempts: int = 5,
        timeout_s: float | None = None,
    ) -> T:
        """Run ``fn(t)`` in a transaction and commit; retry (with backoff, up to
        ``attempts`` times) when it aborts for a retryable reason (conflicts, timeouts).
        Returns what ``fn`` returned from the attempt that committed."""
        age: int | None = None
        for attempt in range(1, attempts + 1):
            try:
                async with self.transaction(timeout_s, age=age) as t:
                    age = age or t.txid
                    result = await fn(t)
                return result
            except TransactionAborted as exc:
                if not exc.retryable or attempt == attempts:
                    raise
                await trio.sleep(min(0.002 * 2**attempt, 0.2) * self.rng.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    async def call(self, key: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """A non-transactional call to the primary of ``key``'s shard."""
        return await self.router.call_for_key(key, method, *args, **kwargs)

    async def outcome(self, txid: int, participants: Iterable[str] | None = None) -> str:
        """The outcome of transaction ``txid``: ``"committed"``, ``"aborted"``, or
        ``"pending"`` (not decided yet: ask again later).

        ``participants`` are the shards (node names) it touched, as in
        ``OutcomeUnknown.details["participants"]`` or ``Transaction.participants``. One
        shard: it was committed in one phase at that shard, which alone knows the outcome
        (the coordinator keeps no record of it), so the shard is asked. Several: the
        coordinator's decision (two-phase commit, presumed abort). Not given: every shard
        is asked, then the coordinator. Asking about a txid nobody has begun aborts it
        for good (the answer stands). A read-only transaction wrote nothing and may be
        reported aborted once its shard forgot it (e.g. after a restart)."""
        if participants is not None:
            names = sorted(set(participants))
            if len(names) == 1 and self.router.shard_map.replication_factor > 1:
                return await self._coordinator_outcome(txid)  # replicated: decided there
            if len(names) == 1:
                state = await self._shard_tx_state(names[0], txid)
                if state == "prepared":  # not one-phase after all: the coordinator decides
                    return await self._coordinator_outcome(txid)
                return {"committed": "committed", "read_only": "committed", "active": "pending"}.get(
                    state, "aborted"
                )
            if names:
                return await self._coordinator_outcome(txid)
        # Unknown participants: look at every shard first. A commit-log entry anywhere is
        # a commit (one-phase, or phase 2 of a decided commit); an ACTIVE transaction may
        # still commit in one phase; a PREPARED one is the coordinator's to decide.
        states = await self._all_shard_tx_states(txid)
        if "committed" in states:
            return "committed"
        if "prepared" in states:
            return await self._coordinator_outcome(txid)
        if "active" in states:
            return "pending"
        return await self._coordinator_outcome(txid)

    async def _coordinator_outcome(self, txid: int) -> str:
        info = await self.coordinator.call("coord.decision", txid)
        return "committed" if info == "commit" else "aborted" if info == "abort" else "pending"

    async def _shard_tx_state(self, name: str, txid: int) -> str:
        client = await self.router._client_for(self.router.shard_map.node(name))
        answer = await client.call("tx.status", txid)
        return str(answer["state"])

    async def _all_shard_tx_states(self, txid: int) -> set[str]:
        states: set[str] = set()
        errors: list[RpcError] = []

        async def ask(name: str) -> None:
            try:
                states.add(await self._shard_tx_state(name, txid))
            except RpcError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for node in self.router.shard_map.nodes:
                nursery.start_soon(ask, node.name)
        if errors and "committed" not in states:
            raise errors[0]  # that shard may hold a one-phase commit: the outcome is not known yet
        return states


class Transaction:
    """One transaction; see :meth:`Cluster.transaction`."""

    def __init__(self, cluster: Cluster, timeout_s: float | None, age: int | None = None) -> None:
        self._cluster = cluster
        self._timeout_s = timeout_s
        self.age = age
        self.txid: int | None = None
        self.participants: set[str] = set()
        self._op_seq_by_node: dict[str, int] = {}
        self._deadline = math.inf
        self._failed: TransactionAborted | None = None
        self.outcome: str | None = None
        self._coordinator_told = False

    async def __aenter__(self) -> Transaction:
        txid, default_timeout_s = await self._cluster._next_txid()
        self.txid = txid
        self._deadline = trio.current_time() + (self._timeout_s or default_timeout_s)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            await self._abort()
            self._cluster.stats["aborted"] += 1
            self.outcome = "aborted"
            return  # the caller's exception (TransactionAborted, or its own) propagates
        await self._commit()

    def call(self, key: str, method: str, /, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """Call ``method`` on the primary of ``key``'s shard within this transaction."""
        return self._operation(key, method, args, kwargs)

    def __getattr__(self, name: str) -> _TxMethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return _TxMethodProxy(self, name)

    async def _operation(self, key: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.txid is None:
            raise RuntimeError("use the transaction inside `async with`")
        if self._failed is not None:
            raise self._failed
        router = self._cluster.router
        deadline = self._deadline
        retries = 0
        try:
            while True:
                shard_map = router.shard_map
                node = shard_map.primary_of(key)
                client = router.held_client(node) or await _connected_by(router, node, deadline)
                self.participants.add(node.name)  # before the call: it may run even if the reply is lost
                # op_seq counts this transaction's operations per shard, from 1: a shard that
                # sees op_seq > 1 for a transaction it does not know refuses it.
                op_seq = self._op_seq_by_node[node.name] = self._op_seq_by_node.get(node.name, 0) + 1
                metadata = {"txid": self.txid, "op_seq": op_seq, EPOCH_METADATA_KEY: shard_map.epoch}
                if self.age is not None:
                    metadata["age"] = self.age
                try:
                    # The deadline bounds the wait without a cancel scope per call (their
                    # cost was ~15 % of the client's CPU); the rarer waits below take one.
                    return await client._call_once(method, args, kwargs, metadata, deadline)
                except DeadlinePassed as exc:
                    if not exc.sent:
                        self._unsend(node.name, op_seq)  # (then no tx.abort to a shard that never heard of it)
                    raise
                except WrongEpoch as exc:
                    # Nothing ran there (the epoch check comes first): as if never sent.
                    self._unsend(node.name, op_seq)
                    if retries >= router.epoch_retries_max:
                        raise
                    retries += 1
                    with trio.move_on_at(deadline) as scope:
                        if not await router._learn(exc, shard_map):
                            await trio.sleep(router._backoff_s(retries))
                    if scope.cancelled_caught:
                        raise DeadlinePassed() from None
                except Unavailable as exc:
                    # The node is unreachable and nothing ran: if the authority has failed
                    # it over, route this operation to the new primary. If it may have run,
                    # this transaction cannot go on (nothing of it has committed): abort
                    # it, retryably, with the newest map for the retry.
                    newer = False
                    with trio.move_on_at(deadline) as scope:
                        newer = await router.newer_map_after_unavailable(shard_map)
                    if scope.cancelled_caught:
                        raise DeadlinePassed() from None
                    if not exc.nothing_ran or retries >= router.epoch_retries_max:
                        self._failed = TransactionAborted(
                            f"shard {node.name} unreachable during an operation: {exc.message}",
                            {"retryable": True, "txid": self.txid},
                        )
                        raise self._failed from None
                    self._unsend(node.name, op_seq)
                    if not newer:
                        raise
                    retries += 1
                except Aborted as exc:
                    self._failed = TransactionAborted(
                        exc.message, {"retryable": True, **exc.details, "txid": self.txid}
                    )
                    raise self._failed from None
        except DeadlinePassed:
            self._failed = TransactionAborted(
                "transaction deadline passed during an operation", {"txid": self.txid, "retryable": True}
            )
            raise self._failed from None

    def _unsend(self, node: str, op_seq: int) -> None:
        """Operation ``op_seq`` never ran at ``node``: the next one there reuses its
        number (a shard refuses a transaction it does not know whose op_seq is > 1) --
        unless a later number was handed out meanwhile (operations of one transaction
        running concurrently): then the gap stays, for a reused number would be answered
        with the stored result of the operation that ran under it."""
        if self._op_seq_by_node.get(node) != op_seq:
            return
        if op_seq == 1:  # not a participant after all
            self.participants.discard(node)
            del self._op_seq_by_node[node]
        else:
            self._op_seq_by_node[node] = op_seq - 1

    async def _abort(self) -> None:
        """Tell the shards we touched (so their locks are free before we return) and, if
        a commit of it was ever sent, the coordinator (so a late one is refused). Before
        that the coordinator has nothing to refuse (a txid never asked to commit is
        presumed aborted), and its copy of the shards' abort cost three processes work
        on every conflict. Best effort, bounded: whatever is not delivered, the shards'
        idle timeout cleans up."""
        router = self._cluster.router

        async def tell_shard(name: str) -> None:
            try:
                client = await router._client_for(router.shard_map.node(name))
                await client.options(retries_max=1).call("tx.abort", self.txid)
            except (RpcError, KeyError) as exc:
                log.info("abort of %s not delivered to %s (%s); its idle timeout frees it", self.txid, name, exc)

        async def tell_coordinator() -> None:
            try:
                await self._cluster.coordinator.options(retries_max=1).call(
                    "coord.abort", self.txid, sorted(self.participants)
                )
            except RpcError as exc:
                log.info("abort of %s not delivered to the coordinator (%s)", self.txid, exc)

        with trio.move_on_after(ABORT_TIMEOUT_S) as scope:
            scope.shield = True
            async with trio.open_nursery() as nursery:
                for name in sorted(self.participants):
                    nursery.start_soon(tell_shard, name)
                if self._coordinator_told:
                    nursery.start_soon(tell_coordinator)

    async def _commit_call(self, participants: list[str], give_up_at: float) -> None:
        """One attempt to commit. A single shard decides alone (one-phase commit, sent
        straight to it: the coordinator keeps no record of it); several go through the
        coordinator's two-phase commit. Both are idempotent by txid."""
        router = self._cluster.router
        if len(participants) == 1 and router.shard_map.replication_factor == 1:
            node = router.shard_map.node(participants[0])
            client = router.held_client(node) or await _connected_by(router, node, give_up_at)
            # (client._call_once: options(retries_max=0).call without building the options,
            # nor a cancel scope for the deadline)
            result = await client._call_once("tx.commit_one_phase", (self.txid,), {}, {}, give_up_at)
            if result["outcome"] != "committed":
                raise Aborted(result.get("reason") or "aborted", {"retryable": True})
            return
        self._coordinator_told = True
        await self._cluster.coordinator._call_once("coord.commit", (self.txid, participants), {}, {}, give_up_at)

    async def _commit(self) -> None:
        participants = sorted(self.participants)
        if not participants:
            self.outcome = "committed"  # touched nothing: nothing to commit
            self._cluster.stats["committed"] += 1
            return
        give_up_at = max(self._deadline, trio.current_time()) + COMMIT_GRACE_S
        attempt = 0
        last: BaseException | None = None
        while trio.current_time() < give_up_at:
            try:
                try:
                    await self._commit_call(participants, give_up_at)
                except DeadlinePassed:
                    raise trio.TooSlowError from None
                self.outcome = "committed"
                self._cluster.stats["committed"] += 1
                return
            except Aborted as exc:
                self.outcome = "aborted"
                self._cluster.stats["aborted"] += 1
                # The decision is abort (or presumed abort: the coordinator does not know
                # the txid, e.g. after its restart): free the shards' locks now rather
                # than at their idle timeout. (Found by the simulator: a restarted
                # coordinator's "unknown" left the locks held for tx_idle_timeout_s.)
                await self._abort()
                if exc.details.get("unknown_txid"):
                    # The coordinator restarted since these txids were leased: the rest of
                    # the lease would be refused the same way. Lease afresh.
                    self._cluster._forget_lease()
                raise TransactionAborted(
                    exc.message, {"retryable": True, **exc.details, "txid": self.txid}
                ) from None
            except (Unavailable, trio.TooSlowError) as exc:
                # commit is idempotent by txid: ask again; the decision, once made, stands.
                last = exc
                attempt += 1
                await trio.sleep(min(0.05 * 2**attempt, 1.0) * self._cluster.rng.uniform(0.5, 1.0))
            except RpcError as exc:
                last = exc
                break
        self.outcome = "unknown"
        self._cluster.stats["unknown"] += 1
        if len(participants) == 1:
            where = f"its shard {participants[0]} decides it (one-phase: no coordinator record)"
        else:
            where = "it is decided and durable at the coordinator (`txrpc tx show`)"
        raise OutcomeUnknown(
            f"could not learn the outcome of transaction {self.txid}: {last}; {where} — ask with "
            "cluster.outcome(txid, participants)",
            {"txid": self.txid, "participants": participants},
        )


async def _connected_by(router: ClusterClient, node: NodeSpec, deadline: float) -> Client:
    """A connection to ``node`` opened by ``deadline`` (else :class:`DeadlinePassed`,
    nothing sent): the slow path of the per-operation calls, which take the open one
    (``router.held_client``) without a cancel scope."""
    with trio.move_on_at(deadline):
        return await router._client_for(node)
    raise DeadlinePassed(sent=False)


class _TxMethodProxy:
    __slots__ = ("_name", "_tx")

    def __init__(self, tx: Transaction, name: str) -> None:
        self._tx = tx
        self._name = name

    def __getattr__(self, name: str) -> _TxMethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return _TxMethodProxy(self._tx, f"{self._name}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        if not args:
            raise TypeError(f"{self._name}: a transactional call is routed by its first argument (the key)")
        return self._tx._operation(args[0], self._name, args, kwargs)


def cluster(
    config: str | Path | ClusterConfig,
    *,
    limits: Limits | None = None,
    rng: random.Random | None = None,
    credentials: Credentials | None = None,
) -> Cluster:
    """A :class:`Cluster` from a ``cluster.toml`` path (or a loaded config)."""
    loaded = config if isinstance(config, ClusterConfig) else load_cluster_config(config)
    return Cluster(loaded, limits=limits, rng=rng, credentials=credentials)


def digest_table(shard_map: ShardMap, replies: dict[str, Any]) -> dict[int, dict[str, tuple[int, str]]]:
    """``{partition: {replica: (rows, digest)}}`` for every partition some replica has
    data of, from ``repl.digests`` replies given at ``shard_map``'s epoch (others, and
    error texts, are left out); a replica without rows of a partition counts as
    ``(0, "")``. Replicas agree when each partition's values are all equal."""
    held = {
        name: {int(p): (int(rows), str(digest)) for p, rows, digest in reply["partitions"]}
        for name, reply in replies.items()
        if isinstance(reply, dict) and int(reply["epoch"]) == shard_map.epoch
    }
    return {
        partition: {m: held[m].get(partition, (0, "")) for m in shard_map.replica_sets[partition] if m in held}
        for partition in sorted({p for partitions in held.values() for p in partitions})
    }


def replicas_in_doubt(replies: dict[str, Any]) -> int:
    """Transactions still in doubt across ``repl.digests`` replies."""
    return sum(int(reply["in_doubt"]) for reply in replies.values() if isinstance(reply, dict))
