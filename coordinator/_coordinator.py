"""The coordinator service: begin, commit (two-phase with presumed abort), abort,
decision queries from participants, and admin. Decisions come from
:class:`CoordinatorCore`; durability from :class:`storage.CoordinatorLog`."""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Mapping
from typing import Any

import trio

import txrpc
from storage import CoordinatorLog, DecisionExists, KvTransaction, stopping
from txrpc import _env
from txrpc._client import DeadlinePassed
from txrpc._service import _current_call_or_none
from txrpc._shardmap import ConfigError, NodeSpec, ShardMap

from ._batching import Alarms, Answers, Rounds, run_all
from ._coordinator_core import CoordinatorCore, CoordTx, Decision, Phase
from ._faults import crash_point

log = logging.getLogger("txrpc.coordinator")

AUTHORITY_NAMESPACE = "txrpc.authority"
HEARTBEAT_INTERVAL_S_DEFAULT = 0.5
CATCH_UP_TIMEOUT_S = 600.0



COMMIT_BATCH_MAX = 256
"""Transactions per ``tx.commit_many`` message in phase 2."""
PREPARE_BATCH_MAX = 256
"""Transactions per ``tx.prepare_many`` message in phase 1."""
PENDING = "PENDING"
"""A ``tx.prepare_many`` answer: that prepare was still running at the shard's cut-off."""
_Prepare = tuple[int, float, Answers[tuple[str, str]]]
"""A queued phase-1 prepare: (txid, deadline, where its vote goes)."""


def _stopping(participant: str, prepares: list[_Prepare]) -> None:
    for _, _, votes in prepares:
        votes.put(participant, ("unreachable", "the coordinator is stopping"))


def _caller_identity() -> str:
    """The authenticated caller's identity, or "" when this server does not authenticate."""
    ctx = _current_call_or_none()
    return ctx.identity if ctx is not None and ctx.secured else ""

class Coordinator:
    """Serve :meth:`service` with a ``txrpc.Server`` and run :meth:`run` beside it.

    ``nodes`` maps participant (node) names to ``(host, port)``.
    """

    def __init__(
        self,
        coordinator_log: CoordinatorLog,
        nodes: Mapping[str, tuple[str, int]],
        *,
        tx_timeout_s: float = 30.0,
        phase_timeout_s: float = 5.0,
        retry_backoff_s: float = 0.05,
        retry_backoff_max_s: float = 2.0,
        txid_block_size: int = 1000,
        rng: random.Random | None = None,
        limits: txrpc.Limits | None = None,
        shard_map: ShardMap | None = None,
        failure_timeout_s: float = 0.0,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S_DEFAULT,
    ) -> None:
        """``shard_map``: makes this coordinator the shard-map authority (the map in its
        storage wins over this one when its epoch is newer). ``failure_timeout_s`` > 0:
        a replica not answering heartbeats for that long is dropped at a new epoch."""
        self.shard_map = shard_map
        self.failure_timeout_s = failure_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._map_lock = trio.Lock()
        self._last_seen: dict[str, float] = {}
        self.log = coordinator_log
        self.nodes = dict(nodes)
        self.core = CoordinatorCore(txid_block_size, tx_timeout_s)
        self.phase_timeout_s = phase_timeout_s
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.rng = rng or random.Random(0)
        self.limits = limits or txrpc.Limits(retries_max=1)
        self._clients: dict[str, txrpc.Client] = {}
        self._nursery: trio.Nursery | None = None
        self._block_lock = trio.Lock()
        self._done: dict[int, trio.Event] = {}
        # Phase-2 commits waiting to be sent, per participant; one sender task each sends
        # them in batches (tx.commit_many), one batch in flight at a time.
        self._commits_to_send: dict[str, list[CoordTx]] = {}
        # Phase-1 prepares queued per participant, sent in rounds of tx.prepare_many (one
        # round in flight per participant: _queue_prepare).
        self._prepares: Rounds[_Prepare, list[_Prepare]] = Rounds(
            lambda queued: [queued[i : i + PREPARE_BATCH_MAX] for i in range(0, len(queued), PREPARE_BATCH_MAX)],
            lambda participant, batch, answered: self._prepare_batch(participant, batch, answered),
            _stopping,
        )
        self._alarms = Alarms()  # bounds each transaction's wait for its votes (no scope each)
        self.ready = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover from the log, then drive phase 2 and expire abandoned transactions."""
        block_end, undone = await self.log.load()
        redo = self.core.recover(block_end, undone)
        abandoned_move = await self._load_map()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._alarms.run)
            for name, (host, port) in sorted(self.nodes.items()):
                client = txrpc.connect(
                    host, port, limits=self.limits, connect_now=False, rng=random.Random(self.rng.random())
                )
                self._clients[name] = await nursery.start(_hold_client, client)
            if abandoned_move:
                assert self.shard_map is not None
                nursery.start_soon(self._publish, self.shard_map)
            for txid in redo:
                log.info("coordinator: re-driving phase 2 of %d", txid)
                nursery.start_soon(self._phase_two, self.core.txs[txid])
            self.ready = True
            task_status.started()
            if self.shard_map is not None and self.failure_timeout_s > 0:
                nursery.start_soon(self._heartbeats)
            while True:
                await trio.sleep(0.5)
                for tx in self.core.expired(trio.current_time()):
                    self.core.abort(tx, "transaction timed out (tx_timeout_s)")
                    self.core.finish_abort(tx)

    def service(self) -> txrpc.Service:
        svc = txrpc.Service("coord")
        for name in ("begin", "lease", "abort", "decision"):
            svc.add_method(getattr(self, name), name=name)
        # Deciding is bounded by the transaction's deadline and phase_timeout_s (see
        # commit): no cancel scope per call.
        svc.add_method(self.commit, name="commit", bounded=True)
        # Operator tools: on a server with security, admins only.
        for name in ("transactions", "show", "resolve"):
            svc.add_method(getattr(self, name), name=name, allow=txrpc.ROLE_ADMIN)
        if self.shard_map is not None:
            svc.add_method(self.get_shard_map, name="shard_map")
            svc.add_method(self.mark_down, name="mark_down", allow=txrpc.ROLE_ADMIN)
            svc.add_method(self.promote, name="promote", allow=txrpc.ROLE_ADMIN)
            svc.add_method(self.rejoin, name="rejoin", allow=txrpc.ROLE_ADMIN)
            svc.add_method(self.add_node, name="add_node", allow=txrpc.ROLE_ADMIN)
            svc.add_method(self.remove_node, name="remove_node", allow=txrpc.ROLE_ADMIN)
        return svc

    # --- the shard-map authority -----------------------------------------------------------------

    def _map(self) -> ShardMap:
        assert self.shard_map is not None, "not the shard-map authority"
        return self.shard_map

    def _check_node(self, node: Any) -> None:
        if not isinstance(node, str) or node not in self._map():
            raise txrpc.InvalidArgument(f"no node named {node!r} in the shard map")

    def _replicated(self) -> bool:
        return self.shard_map is not None and self.shard_map.replication_factor > 1

    async def _load_map(self) -> bool:
        """The durable map (or the configured one, stored). A move this coordinator was
        making when it stopped (its interim map is durable, with the sets it came from)
        is abandoned: those sets come back at a new epoch. Returns True then (the caller
        publishes the map)."""
        if self.shard_map is None:
            return False
        reader = KvTransaction(self.log.database, namespace=AUTHORITY_NAMESPACE)
        stored = await reader.get("shard_map")
        if stored is not None:
            durable = ShardMap.from_wire(stored)
            if durable.epoch >= self.shard_map.epoch:
                self.shard_map = durable
                moving_from = await reader.get("move_previous")
                if moving_from is None:
                    return False
                self.shard_map = ShardMap.from_wire(moving_from).with_epoch(durable.epoch + 1)
                await self._store_map(self.shard_map)
                log.warning("shard map epoch %d: a move interrupted by a restart is abandoned", self.shard_map.epoch)
                return True
        await self._store_map(self.shard_map)
        return False

    async def _store_map(self, shard_map: ShardMap, moving_from: ShardMap | None = None) -> None:
        """``shard_map`` durable; with ``moving_from`` (a move's interim map), the sets
        to go back to if this coordinator stops before the move ends."""
        tx = KvTransaction(self.log.database, namespace=AUTHORITY_NAMESPACE)
        await tx.get("shard_map")
        had_move = await tx.get("move_previous") is not None
        tx.put("shard_map", shard_map.to_wire())
        if moving_from is not None:
            tx.put("move_previous", moving_from.to_wire())
        elif had_move:
            tx.delete("move_previous")
        await tx.commit(self.log.appender)

    async def get_shard_map(self) -> dict[str, Any]:
        """The current shard map (``ShardMap.to_wire`` form)."""
        assert self.shard_map is not None
        return self.shard_map.to_wire()

    async def mark_down(self, node: str) -> dict[str, Any]:
        """Drop ``node`` from every replica set at a new epoch (where it was primary, the
        next replica takes over). ``{"epoch", "published", "unreachable"}``."""
        return await self._change_map(node, "mark_down")

    async def promote(self, node: str) -> dict[str, Any]:
        """Make ``node`` the primary of every partition it replicates, at a new epoch."""
        return await self._change_map(node, "promote")

    async def rejoin(self, node: str) -> dict[str, Any]:
        """Bring ``node`` back into the replica sets the ring places it in (after it was
        marked down and runs again): see :meth:`_move`."""
        self._check_node(node)
        async with self._map_lock:
            current = self._map()
            placement = current.with_nodes(current.nodes, epoch=current.epoch)
            target = []
            for members, ranked in zip(current.replica_sets, placement.replica_sets, strict=True):
                if node in ranked and node not in members:
                    members = _ranked((*members, node), ranked)
                target.append(members)
            if tuple(target) == current.replica_sets:
                raise txrpc.FailedPrecondition(f"node {node!r} already replicates every partition the ring gives it")
            return await self._move(current.nodes, tuple(target), f"rejoin {node}")

    async def add_node(self, node: dict[str, Any]) -> dict[str, Any]:
        """Add a node (``{"name", "host", "port", "zone"?, "weight"?}``, already running)
        and move to it the partitions the ring now places on it (about 1/N of the data):
        see :meth:`_move`."""
        assert self.shard_map is not None
        try:
            spec = NodeSpec(
                node["name"], node["host"], node["port"], zone=node.get("zone"), weight=node.get("weight", 1.0)
            )
        except (KeyError, TypeError, ConfigError) as exc:
            raise txrpc.InvalidArgument(f"not a node: {exc}") from None
        async with self._map_lock:
            current = self._map()
            self._check_movable(current, f"add-node {spec.name}")
            if spec.name in current:
                raise txrpc.FailedPrecondition(f"node {spec.name!r} is already in the shard map")
            nodes = (*current.nodes, spec)
            return await self._move(nodes, self._rebalanced(current, nodes), f"add-node {spec.name}")

    async def remove_node(self, node: str) -> dict[str, Any]:
        """Move every partition off ``node`` to the members the ring picks instead, then
        drop it from the map: see :meth:`_move`."""
        self._check_node(node)
        async with self._map_lock:
            current = self._map()
            self._check_movable(current, f"remove-node {node}")
            nodes = tuple(n for n in current.nodes if n.name != node)
            if len(nodes) < current.replication_factor:
                raise txrpc.FailedPrecondition(
                    f"removing {node!r} would leave {len(nodes)} nodes for replication factor "
                    f"{current.replication_factor}"
                )
            return await self._move(nodes, self._rebalanced(current, nodes), f"remove-node {node}")

    @staticmethod
    def _check_movable(current: ShardMap, what: str) -> None:
        """Online moves copy partitions while transactions run and rely on replication to
        bring the joiner every commit made meanwhile, and on the followers to fence the
        old primary after the hand-over. At R = 1 there is neither: refused."""
        if current.replication_factor < 2:
            raise txrpc.FailedPrecondition(
                f"{what}: online moves need replication_factor >= 2 (this cluster has 1: nothing would "
                "carry the commits made during the copy to the new node, nor fence the old primary "
                "after it). Raise replication_factor, or stop the writers and rebuild the shards."
            )

    @staticmethod
    def _rebalanced(current: ShardMap, nodes: tuple[NodeSpec, ...]) -> tuple[tuple[str, ...], ...]:
        """The replica sets after the ring's change from ``current.nodes`` to ``nodes``,
        applied to the current sets: members the new ring drops leave, members it adds
        join (ranked as the new ring ranks them); replicas marked down stay out."""
        before = current.with_nodes(current.nodes, epoch=current.epoch)
        after = current.with_nodes(nodes, epoch=current.epoch)
        names = {n.name for n in nodes}
        target = []
        for members, old, new in zip(current.replica_sets, before.replica_sets, after.replica_sets, strict=True):
            kept = [m for m in members if m in names and (m in new or m not in old)]
            joined = [m for m in new if m not in old and m not in kept]
            target.append(_ranked((*kept, *joined), new))
        return tuple(target)

    async def _move(
        self, nodes: tuple[NodeSpec, ...], target_sets: tuple[tuple[str, ...], ...], what: str
    ) -> dict[str, Any]:
        """Hand partitions over to ``target_sets`` while transactions run (the map lock
        is held by the caller). One epoch adds every joining replica as a follower (a
        set may hold one extra member meanwhile), so replication reaches it from then
        on; each joiner copies its partitions from their primaries (``repl.catch_up``);
        a second epoch installs the target sets (new primaries take over, in-flight
        transactions of the old ones are fenced and their prepared ones inherited);
        nodes that left a partition drop its rows. A joiner that cannot catch up is
        taken out again and the move is refused."""
        assert self.shard_map is not None
        current = self.shard_map
        by_name = {n.name: n for n in (*current.nodes, *nodes)}
        interim_sets = []
        joining: dict[str, list[int]] = {}
        leaving: dict[str, list[int]] = {}
        for p, (members, target) in enumerate(zip(current.replica_sets, target_sets, strict=True)):
            new = [m for m in target if m not in members]
            for m in new:
                joining.setdefault(m, []).append(p)
            for m in members:
                if m not in target:
                    leaving.setdefault(m, []).append(p)
            interim_sets.append((*members, *new))
        interim = ShardMap(
            current.epoch + 1,
            current.replication_factor,
            current.partitions,
            tuple(by_name.values()),
            tuple(interim_sets),
        )
        copied = {"rows": 0, "deleted": 0}
        failures: dict[str, str] = {}
        previous = current.with_epoch(interim.epoch + 1)  # what an abandoned move goes back to

        async def catch_up(name: str, partitions: list[int]) -> None:
            try:
                client = await self._client(name)
                with trio.fail_after(CATCH_UP_TIMEOUT_S):
                    result = await client.options(retries_max=0, metadata={"epoch": interim.epoch}).call(
                        "repl.catch_up", partitions
                    )
                copied["rows"] += int(result["rows"])
                copied["deleted"] += int(result["deleted"])
            except (txrpc.RpcError, trio.TooSlowError, OSError) as exc:
                failures[name] = str(exc) or type(exc).__name__

        try:
            joined = sum(map(len, joining.values()))
            await self._install(interim, f"{what}: {joined} partition copies join as followers", moving_from=previous)
            async with trio.open_nursery() as nursery:
                for name, partitions in sorted(joining.items()):
                    nursery.start_soon(catch_up, name, partitions)
        except BaseException:
            # Interrupted (the caller went away: its deadline, a dropped connection, the
            # coordinator stopping): a joiner that may not have caught up must not stay
            # a member of its sets (a later failover could make it primary of data it
            # never copied). Abandoned like a failed catch-up; the operator retries.
            # (Found by the simulator: a rejoin cancelled mid-copy left the replica set
            # with an empty follower for good.)
            with trio.CancelScope(shield=True):
                await self._install(previous, f"{what} interrupted: abandoned")
            raise
        if failures:
            with trio.CancelScope(shield=True):
                await self._install(previous, f"{what} abandoned")
            raise txrpc.Unavailable(
                f"{what}: could not catch up "
                + "; ".join(f"{n}: {why}" for n, why in sorted(failures.items()))
                + f"; the previous replica sets are back at epoch {interim.epoch + 1}"
            )
        final = ShardMap(interim.epoch + 1, current.replication_factor, current.partitions, nodes, target_sets)
        published, unreachable = await self._install(final, f"{what}: done ({copied['rows']} rows copied)")
        dropped = 0
        for name, partitions in sorted(leaving.items()):
            try:
                client = await self._client(name)
                with trio.fail_after(CATCH_UP_TIMEOUT_S):
                    result = await client.options(retries_max=0, metadata={"epoch": final.epoch}).call(
                        "repl.drop_partitions", partitions
                    )
                dropped += int(result["deleted"])
            except (txrpc.RpcError, trio.TooSlowError, OSError) as exc:
                log.warning("%s: %s keeps the rows of partitions it left (%s)", what, name, exc)
        return {
            "epochs": [interim.epoch, final.epoch],
            "partitions": sum(map(len, joining.values())),
            "rows": copied["rows"],
            "deleted": copied["deleted"],
            "dropped": dropped,
            "published": published,
            "unreachable": unreachable,
        }

    async def _install(
        self, shard_map: ShardMap, why: str, moving_from: ShardMap | None = None
    ) -> tuple[list[str], list[str]]:
        """Make ``shard_map`` the current map: durable first, then published."""
        await self._store_map(shard_map, moving_from)
        self.shard_map = shard_map
        log.warning("shard map epoch %d: %s", shard_map.epoch, why)
        return await self._publish(shard_map)

    async def _client(self, name: str) -> txrpc.Client:
        """A client to node ``name`` (opened on first use for a node added at run time)."""
        client = self._clients.get(name)
        if client is None:
            assert self.shard_map is not None and self._nursery is not None
            host, port = self.shard_map.node(name).address
            new = txrpc.connect(host, port, limits=self.limits, connect_now=False, rng=random.Random(self.rng.random()))
            client = await self._nursery.start(_hold_client, new)
            self._clients.setdefault(name, client)
            self.nodes[name] = (host, port)
        return self._clients[name]

    async def _change_map(self, node: str, how: str) -> dict[str, Any]:
        self._check_node(node)
        async with self._map_lock:
            try:
                new = self._map().without_replica(node) if how == "mark_down" else self._map().with_primary(node)
            except ConfigError as exc:
                raise txrpc.FailedPrecondition(str(exc)) from None
            published, unreachable = await self._install(new, f"{how.replace('_', '-')} {node}")
        return {"epoch": new.epoch, "published": published, "unreachable": unreachable}

    async def _publish(self, shard_map: ShardMap) -> tuple[list[str], list[str]]:
        """Push ``shard_map`` to every node (bounded; a node that misses it learns it from
        the first replication message or call carrying the newer epoch)."""
        published: list[str] = []
        unreachable: list[str] = []
        wire = shard_map.to_wire()

        async def push(name: str) -> None:
            try:
                with trio.fail_after(self.phase_timeout_s):
                    client = await self._client(name)
                    await client.options(retries_max=0).call("repl.install_map", wire)
                published.append(name)
            except (txrpc.RpcError, trio.TooSlowError, OSError):
                unreachable.append(name)

        async with trio.open_nursery() as nursery:
            for node in shard_map.nodes:
                nursery.start_soon(push, node.name)
        return sorted(published), sorted(unreachable)

    async def _heartbeats(self) -> None:
        """Failure detection: a replica that has not answered a ping for
        ``failure_timeout_s`` is marked down (unless it is the last replica of some
        partition: then it is only reported)."""
        assert self.shard_map is not None
        start = trio.current_time()
        reported: set[str] = set()

        async def ping(name: str) -> None:
            try:
                with trio.fail_after(min(self.failure_timeout_s, self.phase_timeout_s)):
                    await self._clients[name].options(retries_max=0).call("repl.ping")
                self._last_seen[name] = trio.current_time()
                reported.discard(name)
            except (txrpc.RpcError, trio.TooSlowError, OSError):
                pass

        while True:
            shard_map = self.shard_map
            replicas = {m for members in set(shard_map.replica_sets) for m in members}
            async with trio.open_nursery() as nursery:
                for name in sorted(replicas):
                    if name in self._clients:
                        nursery.start_soon(ping, name)
            now = trio.current_time()
            for name in sorted(replicas):
                if now - self._last_seen.get(name, start) > self.failure_timeout_s and name not in reported:
                    try:
                        await self.mark_down(name)
                    except txrpc.RpcError as exc:
                        log.error("node %s is not answering but cannot be marked down: %s", name, exc)
                        reported.add(name)
            await trio.sleep(self.heartbeat_interval_s)

    # --- client-facing -----------------------------------------------------------------------

    async def begin(self, timeout_s: float | None = None) -> dict[str, Any]:
        """A new transaction: ``{"txid": int, "timeout_s": float}``."""
        if timeout_s is not None and not (0 < timeout_s <= 3600):
            raise txrpc.InvalidArgument("timeout_s must be in (0, 3600]")
        async with self._block_lock:
            block_end = self.core.needs_block()
            if block_end is not None:
                await self.log.write_block(block_end)
                self.core.block_written(block_end)
        tx = self.core.begin(trio.current_time(), timeout_s, owner=_caller_identity())
        return {"txid": tx.txid, "timeout_s": tx.deadline - trio.current_time()}

    async def lease(self, count: int = 16) -> dict[str, Any]:
        """``count`` (1..1000) txids for a client to begin transactions with, without a
        round trip each: ``{"first": int, "count": int, "timeout_s": float}``. A leased id
        begins when its first commit or abort reaches the coordinator."""
        if type(count) is not int or not 1 <= count <= 1000:
            raise txrpc.InvalidArgument("count must be an integer in 1..1000")
        async with self._block_lock:
            block_end = self.core.needs_block_for(count)
            if block_end is not None:
                await self.log.write_block(block_end)
                self.core.block_written(block_end)
        first, count = self.core.lease(count, owner=_caller_identity())
        return {"first": first, "count": count, "timeout_s": self.core.tx_timeout_s}

    async def commit(self, txid: int, participants: list[str]) -> dict[str, Any]:
        """Commit ``txid`` on ``participants`` (node names). Returns ``{"outcome": "committed"}``;
        raises ``TransactionAborted`` with the reason otherwise. Idempotent by txid."""
        unknown = [p for p in participants if p not in self.nodes]
        if unknown:
            raise txrpc.InvalidArgument(f"unknown participants {unknown}; known: {sorted(self.nodes)}")
        if not self._check_owner(txid, "commit"):
            record = await self.log.get(txid)
            if record is not None and record["outcome"] == "commit":
                return {"outcome": "committed", "txid": txid}
            raise txrpc.TransactionAborted(
                f"transaction {txid} is unknown to the coordinator (its lease was forgotten, or it expired)",
                {"txid": txid, "retryable": True, "unknown_txid": True},
            )
        kind, tx = self.core.start_commit(txid, tuple(participants), trio.current_time())
        if kind == "one_phase" and self._replicated():
            kind = "prepare"  # replicated shards never decide alone: see specs/replication.md
        if kind == "unknown":
            record = await self.log.get(txid)
            if record is not None and record["outcome"] == "commit":
                return {"outcome": "committed", "txid": txid}
            if record is None and not self._replicated():
                # No record: presumed abort -- unless it has one participant, which may
                # have committed it in one phase (no record is written for that): ask it.
                kind, tx = self.core.redrive_one_phase(txid, tuple(participants), trio.current_time())
                if kind == "one_phase":
                    assert tx is not None
                    # Its owner is unknown here (from before the restart): the
                    # participant, which knows it, checks the caller instead.
                    tx.on_behalf_of = _caller_identity()
                    log.info("coordinator: re-driving %d as one-phase commit (no record)", txid)
            if kind == "unknown":
                raise txrpc.TransactionAborted(
                    f"transaction {txid} is unknown to the coordinator (expired, aborted, or from before a restart)",
                    {"txid": txid, "retryable": True, "unknown_txid": True},
                )
        assert tx is not None
        if kind == "wait":
            event = self._done.setdefault(txid, trio.Event())
            if tx.decision is None:
                await event.wait()
        elif kind in ("one_phase", "prepare"):
            # Deciding must not stop halfway because the caller went away (the server
            # cancels a handler whose connection drops): a decision written but phase 2
            # never started, or votes collected and nothing decided, would hold the
            # shards' locks while this process lives. Both steps are bounded by the
            # transaction's deadline / phase_timeout_s. (Found by txrpc chaos.)
            with trio.CancelScope(shield=True):
                if kind == "one_phase":
                    await self._one_phase(tx)
                else:
                    await self._two_phase(tx)
        return self._outcome(tx)

    def _check_owner(self, txid: int, what: str) -> bool:
        """On a coordinator that authenticates callers: a transaction is its owner's (the
        identity that began or leased it) to commit, abort or ask about; peers and admins
        may touch any. Another client is refused and the transaction is unaffected.

        Returns False when an ordinary client names an id of this incarnation whose
        owner is not known here (a forgotten lease, a transaction finished long ago, an
        id never handed out): it may then learn a recorded outcome but change nothing.
        (Ids of an earlier incarnation have no known owner either; the shard, which
        knows, checks the caller on the coordinator's behalf.)"""
        ctx = _current_call_or_none()
        if ctx is None or not ctx.secured or not ctx.roles.isdisjoint(txrpc.ROLE_PEER_OR_ADMIN):
            return True
        if type(txid) is not int:
            raise txrpc.InvalidArgument("txid must be an integer")
        owner = self.core.owner_of(txid)
        if owner:
            if owner != ctx.identity:
                raise txrpc.PermissionDenied(
                    f"{ctx.identity!r} may not {what} transaction {txid}: it belongs to another caller",
                    {"txid": txid},
                )
            return True
        return txid < self.core.first_txid

    def _outcome(self, tx: CoordTx) -> dict[str, Any]:
        if tx.decision is Decision.COMMIT:
            return {"outcome": "committed", "txid": tx.txid}
        if tx.decision is None:  # a one-phase commit we waited for got no answer
            raise txrpc.Unavailable(
                f"one-phase commit of {tx.txid}: its participant did not answer; outcome unknown",
                {"txid": tx.txid, "outcome_unknown": True},
            )
        raise txrpc.TransactionAborted(
            tx.reason or "aborted", {"txid": tx.txid, "retryable": not tx.reason.startswith("user:")}
        )

    async def abort(self, txid: int, participants: list[str] | None = None) -> str:
        """The client gives up on ``txid`` (idempotent); the ``participants`` it touched
        are told to abort (in the background) so their locks are freed at once."""
        known = [p for p in participants or () if p in self.nodes]
        if not self._check_owner(txid, "abort"):
            return "ok"  # whose it is is not known here: nothing to do on an ordinary client's word
        tx = self.core.txs.get(txid)
        if tx is not None and tx.phase is Phase.PREPARING:
            return "ok"  # the commit in progress decides
        if tx is not None and tx.decision is None:
            self.core.abort(tx, "aborted by the client")
            tx.participants = tuple(sorted(set(tx.participants) | set(known)))
            if tx.participants:
                assert self._nursery is not None
                self._nursery.start_soon(self._phase_two, tx)
            else:
                self.core.finish_abort(tx)
        elif tx is None and self.core.get(txid) is None:
            self.core.forget_as_aborted(txid, "aborted by the client")
        if tx is None and known and self.core.decision(txid) is not Decision.COMMIT:
            record = await self.log.get(txid)
            if record is None or record["outcome"] != "commit":
                assert self._nursery is not None
                for participant in known:
                    self._nursery.start_soon(self._tell_abort, participant, txid, _caller_identity())
        return "ok"

    async def _tell_abort(self, participant: str, txid: int, on_behalf_of: str = "") -> None:
        """Abort ``txid`` at ``participant``; ``on_behalf_of`` names the client that asked
        when the coordinator does not know the owner (the shard checks it)."""
        try:
            if on_behalf_of:
                await self._participant_call(participant, "tx.abort", txid, on_behalf_of)
            else:
                await self._participant_call(participant, "tx.abort", txid)
        except (txrpc.RpcError, trio.TooSlowError) as exc:
            log.info("coordinator: abort(%d) to %s failed (%s); its idle timeout frees it", txid, participant, exc)

    async def decision(self, txid: int) -> str | None:
        """For participants in doubt: ``"commit"``, ``"abort"``, or None (ask again)."""
        if not self._check_owner(txid, "ask for the decision of"):
            record = await self.log.get(txid)
            if record is not None:
                return "commit" if record["outcome"] == "commit" else "abort"
            return "abort"  # nothing recorded: it cannot commit (not adoptable); nothing remembered
        tx = self.core.get(txid)
        if tx is not None:
            d = self.core.decision(txid)
            return None if d is None else d.value
        record = await self.log.get(txid)
        if record is not None:
            return "commit" if record["outcome"] == "commit" else "abort"
        self.core.forget_as_aborted(txid, "presumed abort (unknown when asked)")  # a late commit is refused
        return "abort"

    # --- admin -----------------------------------------------------------------------------------

    async def transactions(self, in_doubt: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        live = [self._describe(tx) for tx in (self.core.in_doubt() if in_doubt else list(self.core.txs.values()))]
        if not in_doubt:
            recorded = await self.log.list(limit=limit)
            seen = {t["txid"] for t in live}
            live += [dict(r, phase="recorded") for r in recorded if r["txid"] not in seen]
        return sorted(live, key=lambda t: -t["txid"])[:limit]

    async def show(self, txid: int) -> dict[str, Any]:
        tx = self.core.get(txid)
        record = await self.log.get(txid)
        if tx is None and record is None:
            raise txrpc.NotFound(f"transaction {txid} is not known (presumed aborted)")
        out: dict[str, Any] = self._describe(tx) if tx is not None else {"txid": txid}
        if record is not None:
            out["record"] = record
        return out

    async def resolve(self, txid: int, outcome: str) -> str:
        """Heuristic decision by an operator; refused if a decision exists."""
        if outcome not in ("commit", "abort"):
            raise txrpc.InvalidArgument("outcome must be 'commit' or 'abort'")
        tx = self.core.get(txid)
        if tx is not None and (txid in self.core.txs or tx.decision is Decision.COMMIT):
            raise txrpc.FailedPrecondition(f"transaction {txid} is {tx.phase.value}: the coordinator decides it")
        try:
            await self.log.write_decision(txid, outcome, (), heuristic=True, reason="operator", done=True)
        except DecisionExists as exc:
            raise txrpc.FailedPrecondition(str(exc)) from None
        return outcome

    def _describe(self, tx: CoordTx) -> dict[str, Any]:
        return {
            "txid": tx.txid,
            "phase": tx.phase.value,
            "participants": list(tx.participants),
            "votes": dict(tx.votes),
            "acked": sorted(tx.acked),
            "reason": tx.reason,
        }

    # --- the protocol ------------------------------------------------------------------------------

    async def _participant_call(self, participant: str, method: str, *args: Any, deadline: float = math.inf) -> Any:
        """``method(*args)`` at ``participant``, bounded by ``phase_timeout_s`` and by
        ``deadline``; ``trio.TooSlowError`` when either passes. Bounded by the
        connection's timer, not a cancel scope: on the coordinator's hot path a scope
        cost about as much as the call."""
        client = self._clients[participant]
        try:
            return await client._call_retried(method, args, min(deadline, trio.current_time() + self.phase_timeout_s))
        except DeadlinePassed:
            raise trio.TooSlowError from None

    async def _one_phase(self, tx: CoordTx) -> None:
        (participant,) = tx.participants
        deadline = max(tx.deadline, trio.current_time() + self.phase_timeout_s)
        attempt = 0
        try:
            while True:
                try:
                    if tx.on_behalf_of:
                        result = await self._participant_call(
                            participant, "tx.commit_one_phase", tx.txid, tx.on_behalf_of, deadline=deadline
                        )
                    else:
                        result = await self._participant_call(
                            participant, "tx.commit_one_phase", tx.txid, deadline=deadline
                        )
                    self.core.one_phase_result(tx, result["outcome"] == "committed", result.get("reason", ""))
                    return
                except txrpc.PermissionDenied:
                    raise  # the caller is not the transaction's owner: nothing was done
                except (txrpc.RpcError, trio.TooSlowError) as exc:
                    if isinstance(exc, trio.TooSlowError) or trio.current_time() >= deadline:
                        # The participant may have committed: the outcome is not ours to guess.
                        raise txrpc.Unavailable(
                            f"one-phase commit of {tx.txid} on {participant}: no answer ({exc}); outcome unknown",
                            {"txid": tx.txid, "outcome_unknown": True},
                        ) from None
                    attempt += 1
                    await trio.sleep(self._backoff(attempt))
        finally:
            if tx.decision is None:
                # No answer (or cancelled): a retried commit asks the participant again,
                # which answers from its commit log.
                self.core.one_phase_unanswered(tx)
            self._signal(tx)

    async def _two_phase(self, tx: CoordTx) -> None:
        try:
            await self._two_phases(tx)
        finally:
            # Duplicate commits of it wait for this (coord.commit has no cancel scope per
            # call): whatever happened, they must wake.
            self._signal(tx)

    async def _two_phases(self, tx: CoordTx) -> None:
        now = trio.current_time()
        deadline = max(tx.deadline, now + 0.001)
        pending: Answers[tuple[str, str]] = Answers(len(tx.participants))
        for participant in tx.participants:
            self._queue_prepare(participant, tx.txid, deadline, pending)
        if self._alarms.running:  # (entering and leaving a scope here: ~8 % of this process's py-spy samples at R = 3)
            self._alarms.set_at(min(deadline, now + self.phase_timeout_s), pending.complete)
            await pending.complete.wait()
        else:
            with trio.move_on_at(min(deadline, now + self.phase_timeout_s)):
                await pending.complete.wait()
        votes = dict(pending.answers)
        for participant in tx.participants:
            votes.setdefault(participant, ("unreachable", "TooSlowError: no vote before the deadline"))
        if _env.broken("coordinator.commit_without_all_votes"):
            # Test-only broken protocol (simulator): a no or a missing vote counts as yes.
            votes = {p: ("yes", "") if v[0] != "read_only" else v for p, v in votes.items()}
        decision = None
        for participant in tx.participants:
            vote, reason = votes[participant]
            if vote == "unreachable":
                self.core.prepare_failed(tx, participant, reason)
                decision = Decision.ABORT
                break
            decision = self.core.vote(tx, participant, vote, f"{participant} voted no: {reason}" if reason else "")
            if decision is Decision.ABORT:
                break
        if decision is Decision.COMMIT:
            if _env.buggify("coordinator.slow_decision_write"):
                await trio.sleep(self.rng.uniform(0.0, self.phase_timeout_s))
            try:
                if not _env.broken("coordinator.skip_decision_write"):  # test-only broken protocol
                    await self.log.write_decision(tx.txid, "commit", tx.writers)
            except Exception as exc:
                # Not durable: we may not commit. Nothing was told to anyone yet.
                report = log.info if stopping(exc) else log.error  # (a stop is expected)
                report("coordinator: decision record for %d failed: %s", tx.txid, exc)
                self.core.abort(tx, f"decision record not durable: {exc}")
            else:
                crash_point("coordinator.after_decision")
                self.core.commit_decided(tx)
        if tx.phase in (Phase.COMMITTING, Phase.ABORTING):
            self._start_phase_two(tx)

    def _queue_prepare(self, participant: str, txid: int, deadline: float, votes: Answers[tuple[str, str]]) -> None:
        """Queue ``tx.prepare(txid)`` for ``participant``: every prepare queued before its
        sender task runs goes in the same ``tx.prepare_many`` (one message, one handler
        run and one group commit at the shard for all of them).

        One round per participant is in flight at a time (:class:`Rounds`): with none, the
        sender runs in this scheduler round (no added wait); while one is unanswered,
        prepares queue and leave together once its answer arrives (not its ``PENDING``
        resends). So batches grow with the load by themselves: at R = 3 in the
        simulator 9.44 -> 7.82 M instructions per transfer with the same rule for
        replicated records (specs/commit-protocol.md, phase 1)."""
        nursery = self._nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            votes.put(participant, ("unreachable", "the coordinator is stopping"))
            return
        self._prepares.put(nursery, participant, (txid, deadline, votes))

    async def _prepare_batch(self, participant: str, batch: list[_Prepare], answered: Callable[[], None]) -> None:
        """One ``tx.prepare_many``; every transaction of the batch gets a vote from it (an
        error, or no answer, is "unreachable": abort), whatever happens here. A txid the
        shard answered ``PENDING`` (still preparing at its cut-off, so that one slow
        prepare does not hold back the others' votes) is asked again alone with
        ``tx.prepare``, which waits for that prepare; so is every txid of a shard without
        ``tx.prepare_many`` (an older version). ``answered`` is called once, when the
        ``tx.prepare_many`` is answered or failed (before any resend)."""
        txids = [txid for txid, _, _ in batch]
        deadline = max(d for _, d, _ in batch)
        told = [False]

        def tell() -> None:
            if not told[0]:
                told[0] = True
                answered()

        try:
            try:
                answers = await self._participant_call(participant, "tx.prepare_many", txids, deadline=deadline)
            except txrpc.Unimplemented:
                answers = [PENDING] * len(txids)
            tell()
            if not isinstance(answers, list) or len(answers) != len(txids):
                raise txrpc.Internal(f"{participant} answered tx.prepare_many with {answers!r:.80}")

            async def alone(index: int) -> None:
                try:
                    answers[index] = await self._participant_call(
                        participant, "tx.prepare", txids[index], deadline=deadline
                    )
                except (txrpc.RpcError, trio.TooSlowError) as exc:
                    answers[index] = f"{type(exc).__name__}: {exc}"

            again = [i for i, answer in enumerate(answers) if answer == PENDING]
            if again:
                await run_all([functools.partial(alone, i) for i in again])
            for (_, _, votes), answer in zip(batch, answers, strict=True):
                if isinstance(answer, dict) and isinstance(answer.get("vote"), str):
                    votes.put(participant, (answer["vote"], str(answer.get("reason", ""))))
                else:
                    votes.put(participant, ("unreachable", str(answer)))
        except (txrpc.RpcError, trio.TooSlowError) as exc:
            for _, _, votes in batch:
                votes.put(participant, ("unreachable", f"{type(exc).__name__}: {exc}"))
        except Exception as exc:
            log.exception("coordinator: prepares of %d txs at %s failed", len(batch), participant)
            for _, _, votes in batch:
                votes.put(participant, ("unreachable", f"{type(exc).__name__}: {exc}"))
        finally:
            tell()
            for _, _, votes in batch:  # (cancelled: the coordinator is stopping)
                votes.put(participant, ("unreachable", "no answer: the coordinator is stopping"))

    def _start_phase_two(self, tx: CoordTx) -> None:
        assert self._nursery is not None
        try:
            if tx.decision is Decision.COMMIT:
                self._queue_commits(tx)  # (what _phase_two does for a commit, without a task)
            else:
                self._nursery.start_soon(self._phase_two, tx)
        except RuntimeError:
            # The coordinator is stopping (its nursery is closed): a commit decision is
            # durable and is re-driven on recovery; an abort is presumed.
            log.info("coordinator stopping: phase 2 of %d left to recovery", tx.txid)

    async def _phase_two(self, tx: CoordTx) -> None:
        """Tell every writing participant the decision, retrying until acknowledged
        (commit) or for a bounded time (abort: participants may also ask; presumed abort).
        Commits go through each participant's batch sender (:meth:`_send_commits`)."""
        commit = tx.decision is Decision.COMMIT
        if commit:
            self._queue_commits(tx)
            return
        targets = self.core.abort_targets(tx)
        method = "tx.abort"

        async def tell(participant: str) -> None:
            attempt = 0
            while True:
                try:
                    await self._participant_call(participant, method, tx.txid)
                    crash_point("coordinator.during_phase_two")
                    return
                except (txrpc.RpcError, trio.TooSlowError) as exc:
                    attempt += 1
                    if not commit and attempt > 5:
                        return  # the participant will ask, or abort an unprepared transaction by timeout
                    log.info("coordinator: %s(%d) to %s failed (%s); retrying", method, tx.txid, participant, exc)
                    await trio.sleep(self._backoff(attempt))

        async with trio.open_nursery() as nursery:
            for participant in targets:
                nursery.start_soon(tell, participant)
        for participant in targets:
            self.core.acked(tx, participant)
        if tx.phase is not Phase.ABORTED:
            # Read-only voters need no abort; an unreachable shard asks or times out.
            self.core.finish_abort(tx)

    def _queue_commits(self, tx: CoordTx) -> None:
        """Queue a committed transaction for each writer's batch sender (:meth:`_send_commits`)."""
        assert self._nursery is not None
        for participant in tx.writers:
            queue = self._commits_to_send.get(participant)
            if queue is None:
                self._nursery.start_soon(self._send_commits, participant)
                self._commits_to_send[participant] = [tx]
            else:
                queue.append(tx)

    async def _send_commits(self, participant: str) -> None:
        """Phase-2 commits to ``participant``, in batches of up to ``COMMIT_BATCH_MAX``:
        whatever queued while the previous batch was in flight goes in the next one (one
        message and one handler run at the shard for many transactions, its writes in
        one group commit). Retried until acknowledged, like single commits; a
        transaction is done (its done mark written) when every writer acknowledged it."""
        queue = self._commits_to_send[participant]
        attempt = 0
        try:
            while queue:
                batch = queue[:COMMIT_BATCH_MAX]
                try:
                    answers = await self._commit_batch(participant, [tx.txid for tx in batch])
                    crash_point("coordinator.during_phase_two")
                except (txrpc.RpcError, trio.TooSlowError) as exc:
                    attempt += 1
                    log.info("coordinator: commit of %d txs to %s failed (%s); retrying", len(batch), participant, exc)
                    await trio.sleep(self._backoff(attempt))
                    continue
                attempt = 0
                del queue[: len(batch)]
                done = []
                refused = 0
                for tx, answer in zip(batch, answers, strict=True):
                    if answer != "ok":
                        log.warning("coordinator: commit(%d) at %s: %s; retrying", tx.txid, participant, answer)
                        queue.append(tx)
                        refused += 1
                    elif self.core.acked(tx, participant):
                        done.append(tx)  # (an ack that leaves others to wait for is not a refusal)
                if done:
                    self._mark_done(done)  # not waited for: the next batch goes now
                if refused:
                    await trio.sleep(self._backoff(1))  # a refused commit: not in a tight loop
        finally:
            del self._commits_to_send[participant]

    async def _commit_batch(self, participant: str, txids: list[int]) -> list[str]:
        """``tx.commit_many(txids)``, answers checked (one per txid); a shard without it
        (an older version) gets one ``tx.commit`` per txid instead."""
        try:
            answers = await self._participant_call(participant, "tx.commit_many", txids)
        except txrpc.Unimplemented:
            answers = []
            for txid in txids:
                try:
                    answers.append(await self._participant_call(participant, "tx.commit", txid))
                except txrpc.Unavailable:
                    raise  # the shard is unreachable: the whole batch is retried
                except txrpc.RpcError as exc:
                    answers.append(f"{exc.code.name}: {exc.message}")
        if not isinstance(answers, list) or len(answers) != len(txids):
            raise txrpc.Internal(f"{participant} answered tx.commit_many with {answers!r:.80} for {len(txids)} txids")
        return [a if isinstance(a, str) else repr(a) for a in answers]

    def _mark_done(self, txs: list[CoordTx]) -> None:
        """Done marks of finished commits, queued for the next group commit (no task: no
        one waits for them). A lost mark only means phase 2 is re-driven (idempotently)
        after a restart."""
        for tx in txs:
            assert tx.phase is Phase.COMMITTED
            txid = tx.txid

            def written(_: Any, error: BaseException | None, txid: int = txid) -> None:
                if error is not None:
                    log.warning("coordinator: done mark of %d not written (%s); re-driven after a restart", txid, error)

            try:
                self.log.mark_done_nowait(txid, set(tx.writers), written)
            except Exception as exc:  # closed (stopping), or its queue full
                written(None, exc)

    def _signal(self, tx: CoordTx) -> None:
        event = self._done.pop(tx.txid, None)
        if event is not None:
            event.set()

    def _backoff(self, attempt: int) -> float:
        base = min(self.retry_backoff_s * 2.0 ** (attempt - 1), self.retry_backoff_max_s)
        return base * self.rng.uniform(0.5, 1.0)


async def _hold_client(
    client: txrpc.Client, *, task_status: trio.TaskStatus[txrpc.Client] = trio.TASK_STATUS_IGNORED
) -> None:
    async with client:
        task_status.started(client)
        await trio.sleep_forever()


def _ranked(members: tuple[str, ...], ranking: tuple[str, ...]) -> tuple[str, ...]:
    """``members`` in the order of ``ranking`` (members it does not rank last, as they were)."""
    ranked = [m for m in ranking if m in members]
    return (*ranked, *(m for m in members if m not in ranked))
