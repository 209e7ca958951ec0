"""Running the pieces as processes (or tasks): a coordinator, a shard node."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import trio

import txrpc
from storage import CoordinatorLog, ShardStore, open_storage
from txrpc._routing import EpochGuard
from txrpc._shardmap import ClusterConfig, ShardMap

from ._coordinator import Coordinator
from ._participant import Participant
from ._replication import PeerClients, Replication

log = logging.getLogger("txrpc.runtime")

COORDINATOR_RULES: dict[str, frozenset[str]] = {
    "coord.resolve": txrpc.ROLE_ADMIN,  # a heuristic decision overrides the protocol
    "coord.transactions": txrpc.ROLE_ADMIN,  # lists every caller's transactions
    "coord.show": txrpc.ROLE_ADMIN,
}
"""Who may call what at a coordinator with ``[security]``; the other ``coord.*`` methods
(begin, lease, commit, abort, decision) are open to every authenticated caller."""
SHARD_CALL_TIMEOUT_MAX_S = 300.0
"""No operation runs longer at a shard, whatever deadline it carries: bounds how long a
call can hold a transaction's locks (``Limits.call_timeout_max_s``)."""


def _node_security(
    config: ClusterConfig, name: str, rules: dict[str, frozenset[str]] | None = None
) -> tuple[txrpc.ServerSecurity | None, txrpc.Credentials | None]:
    """What node ``name`` serves with, and presents as a client (the ambient credentials
    when the cluster has no ``[security]`` table)."""
    if config.security is None:
        return None, txrpc.current_credentials()
    return config.security.server_security(name, rules=rules), config.security.credentials_for(name)


def _storage_target(data_dir: Path, db_url: str | None) -> str | Path:
    if db_url:
        return db_url
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


async def run_coordinator(
    config: ClusterConfig,
    *,
    db_url: str | None = None,
    tx_timeout_s: float = 30.0,
    phase_timeout_s: float = 5.0,
    rng_seed: int = 0,
    failure_timeout_s: float | None = None,
    task_status: trio.TaskStatus[Coordinator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the coordinator of ``config`` until cancelled (``failure_timeout_s``
    overrides the file's ``[coordinator] failure_timeout_s``)."""
    if config.coordinator is None:
        raise ValueError(f"{config.source}: no [coordinator] table")
    spec = config.coordinator
    nodes = {node.name: node.address for node in config.shard_map.nodes}
    security, credentials = _node_security(config, "coordinator", COORDINATOR_RULES)
    async with open_storage(_storage_target(spec.data_dir, db_url)) as storage:
        coordinator = Coordinator(
            CoordinatorLog(storage.database, storage.appender),
            nodes,
            tx_timeout_s=tx_timeout_s,
            phase_timeout_s=phase_timeout_s,
            rng=random.Random(rng_seed),
            shard_map=config.shard_map,
            failure_timeout_s=spec.failure_timeout_s if failure_timeout_s is None else failure_timeout_s,
        )
        async with trio.open_nursery() as nursery:
            with txrpc.use_credentials(credentials):  # its clients (to every shard) present them
                await nursery.start(coordinator.run)
            server = txrpc.Server(coordinator.service(), security=security)
            await nursery.start(server.serve_tcp, spec.host, spec.port)
            log.info("coordinator serving on %s:%d", spec.host, server.port)
            task_status.started(coordinator)


async def run_shard(
    config: ClusterConfig,
    node: str,
    services: list[txrpc.Service],
    *,
    db_url: str | None = None,
    tx_idle_timeout_s: float = 10.0,
    rng_seed: int = 0,
    task_status: trio.TaskStatus[Participant] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` as node ``node`` of ``config`` until cancelled. Prepared
    transactions are recovered (their locks re-taken) before anything is served."""
    spec = config.shard_map.node(node)
    coordinator_spec = config.coordinator
    security, credentials = _node_security(config, node)
    async with open_storage(_storage_target(config.data_dir_for(node), db_url)) as storage:
        store = ShardStore(storage.database, storage.appender, node)
        async with trio.open_nursery() as nursery:
            coordinator_client: txrpc.Client | None = None
            if coordinator_spec is not None:
                client = txrpc.connect(
                    coordinator_spec.host, coordinator_spec.port, connect_now=False, credentials=credentials
                )
                coordinator_client = await nursery.start(_hold, client)
            guard = EpochGuard(config.shard_map, node=node)
            peers = PeerClients(config.shard_map, credentials, current_map=lambda: guard.shard_map)
            await nursery.start(peers.run)
            map_source = None
            if coordinator_client is not None:
                held = coordinator_client

                async def map_source() -> ShardMap:
                    return ShardMap.from_wire(await held.options(retries_max=0).call("coord.shard_map"))

            replication = Replication(node, guard, peers.get, map_source=map_source)
            await nursery.start(replication.run)
            await replication.refresh()  # a restarted node learns the current epoch before serving
            participant = Participant(
                services,
                store,
                shard=node,
                coordinator=coordinator_client,
                epoch_guard=guard,
                tx_idle_timeout_s=tx_idle_timeout_s,
                rng=random.Random(rng_seed),
                replication=replication,
            )
            await participant.recover()
            await nursery.start(participant.run)
            limits = txrpc.Limits(call_timeout_max_s=SHARD_CALL_TIMEOUT_MAX_S)
            server = txrpc.Server(*participant.services(), security=security, limits=limits)
            with txrpc.use_credentials(credentials):  # calls its handlers make present them
                await nursery.start(server.serve_tcp, spec.host, spec.port)
            log.info("shard %s serving on %s:%d", node, spec.host, server.port)
            task_status.started(participant)


async def _hold(
    client: txrpc.Client, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    async with client:
        task_status.started(client)
        await trio.sleep_forever()
