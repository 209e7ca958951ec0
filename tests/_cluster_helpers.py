"""Start a coordinator and shard nodes in-process (real TCP on loopback, real SQLite)."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

import txrpc
from coordinator import Coordinator, Participant, run_coordinator, run_shard
from txrpc._shardmap import ClusterConfig

ROOT = Path(__file__).parent.parent


def load_bank_service() -> txrpc.Service:
    """The bank service of ``examples/bank/service.py`` (the examples are not a package)."""
    spec = importlib.util.spec_from_file_location("bank_example", ROOT / "examples/bank/service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    service: txrpc.Service = module.bank
    return service


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def cluster_toml(
    data_dir: Path, nodes: int = 3, partitions: int = 256, services: str | None = None, replication_factor: int = 1
) -> str:
    ports = free_ports(nodes + 1)
    lines = [
        "[cluster]",
        f"replication_factor = {replication_factor}",
        f"partitions = {partitions}",
        f'data_dir = "{data_dir}"',
    ]
    if services:
        lines.append(f"services = [{services!r}]".replace("'", '"'))
    lines += ["", "[coordinator]", 'host = "127.0.0.1"', f"port = {ports[0]}", ""]
    for index in range(nodes):
        lines += ["[[nodes]]", f'name = "n{index}"', 'host = "127.0.0.1"', f"port = {ports[index + 1]}", ""]
    return "\n".join(lines)


def make_config(data_dir: Path, nodes: int = 3, replication_factor: int = 1) -> ClusterConfig:
    return ClusterConfig.from_toml(
        cluster_toml(data_dir, nodes, replication_factor=replication_factor), source="test-cluster.toml"
    )


@dataclass
class LocalCluster:
    config: ClusterConfig
    nursery: trio.Nursery
    services: list[txrpc.Service]
    coordinator: Coordinator | None = None
    participants: dict[str, Participant] = field(default_factory=dict)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    async def start_coordinator(self, **kwargs: Any) -> Coordinator:
        scope = trio.CancelScope()
        self.scopes["coordinator"] = scope

        async def run(task_status: trio.TaskStatus[Coordinator] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_coordinator(
                    self.config, task_status=task_status, **{**self.options.get("coordinator", {}), **kwargs}
                )

        self.coordinator = await self.nursery.start(run)
        return self.coordinator

    async def start_shard(self, name: str, **kwargs: Any) -> Participant:
        scope = trio.CancelScope()
        self.scopes[name] = scope

        async def run(task_status: trio.TaskStatus[Participant] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await run_shard(
                    self.config,
                    name,
                    self.services,
                    task_status=task_status,
                    **{**self.options.get("shard", {}), **kwargs},
                )

        participant: Participant = await self.nursery.start(run)
        self.participants[name] = participant
        return participant

    def crash(self, name: str) -> None:
        """Crash = cancel the node's task tree and drop its memory (storage stays)."""
        self.scopes.pop(name).cancel()
        self.participants.pop(name, None)
        if name == "coordinator":
            self.coordinator = None

    async def stop(self) -> None:
        for name in list(self.scopes):
            self.crash(name)
        await trio.sleep(0)


@asynccontextmanager
async def local_cluster(
    data_dir: Path, services: list[txrpc.Service], nodes: int = 3, replication_factor: int = 1, **options: Any
) -> AsyncIterator[LocalCluster]:
    config = make_config(data_dir, nodes, replication_factor)
    async with trio.open_nursery() as nursery:
        cluster = LocalCluster(config, nursery, services, options=options)
        await cluster.start_coordinator()
        for node in config.shard_map.nodes:
            await cluster.start_shard(node.name)
        try:
            yield cluster
        finally:
            await cluster.stop()


async def deposits_at(
    cluster: txrpc.Cluster, shard: txrpc.Client, names: list[str], epoch: int, amount: int = 1
) -> list[int]:
    """One transaction per name, each depositing ``amount`` there at its primary ``shard``
    (no prepare yet): their txids."""
    txids = []
    for name in names:
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
        await shard.options(metadata={"txid": txid, "op_seq": 1, "epoch": epoch}).call("bank.deposit", name, amount)
        txids.append(txid)
    return txids
