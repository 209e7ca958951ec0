"""Replicated shards as real processes (R = 3 on 3 nodes): a primary SIGKILLed during a
transfer workload, failed over with `txrpc ring mark-down`, restarted and brought back
with `txrpc ring rejoin` while transfers run, then a fourth node added with `txrpc ring
add-node`; totals conserved, `txrpc ring verify` finds every replica set equal, and each
node's commit log rebuilds its state (`txrpc replay --shard`)."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import txrpc
from txrpc._demo import Processes, write_cluster_file

NODES = ["a", "b", "c"]
ACCOUNTS = [f"acct{i}" for i in range(12)]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(write_cluster_file(tmp_path, replication_factor=3), NODES)
    try:
        yield processes
    finally:
        processes.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def txrpc_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "txrpc.cli", *args], capture_output=True, text=True, timeout=120
    )


async def transfers_until(cluster: txrpc.Cluster, stop: trio.Event, seed: int, counts: dict[str, int]) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        a, b = rng.sample(ACCOUNTS, 2)

        async def body(t: Any, a: str = a, b: str = b) -> None:
            await t.bank.withdraw(a, 1)
            await t.bank.deposit(b, 1)

        try:
            with trio.fail_after(20):
                await cluster.run_transaction(body, attempts=2, timeout_s=10)
            counts["committed"] += 1
        except (txrpc.TransactionAborted, txrpc.OutcomeUnknown, txrpc.Unavailable, trio.TooSlowError):
            counts["failed"] += 1
            await trio.sleep(0.05)


async def more_commits(counts: dict[str, int], wanted: int, timeout_s: float = 90) -> None:
    """Wait until the workload has committed ``wanted`` more transfers."""
    target = counts["committed"] + wanted
    with trio.fail_after(timeout_s):
        while counts["committed"] < target:
            await trio.sleep(0.05)


def explain_logs(data: Path) -> str:
    """For a failed conservation check: where a key's value in a node's commit log does
    not follow from the one before it (every transfer moves 1; snapshot entries, txid 0,
    may jump, and so may the log of a node that was down), with the transaction ids, to
    look up in the other nodes' logs."""
    import sqlite3

    import cbor2

    from coordinator._replication import txid_of
    from storage._txn_schema import commit_log

    lines = []
    for db in sorted(data.glob("*/txrpc.db")):
        if db.parent.name == "coordinator":
            continue
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            rows = conn.execute(f"SELECT position, txid, writes FROM {commit_log.name} ORDER BY position").fetchall()
        last: dict[str, tuple[Any, int, int]] = {}
        for position, txid, writes in rows:
            for key, deleted, value in cbor2.loads(writes):
                value = None if deleted else value
                before = last.get(key)
                if txid != 0 and before is not None and None not in (before[0], value) and abs(value - before[0]) != 1:
                    lines.append(f"{db.parent.name} {key}: {before} -> {(value, txid_of(txid), position)}")
                last[key] = (value, txid_of(txid), position)
    return "\n".join(lines) or "no jump in any commit log"


async def total(cluster: txrpc.Cluster) -> int:
    return sum([int(await cluster.call(n, "bank.balance", n)) for n in ACCOUNTS])


def test_primary_killed_fails_over_rejoins_and_replicas_agree(procs: Processes) -> None:
    for name in ["coordinator", *NODES]:
        procs.start(name)
    for name in ["coordinator", *NODES]:
        procs.wait_ready(name)
    config_path = str(procs.config_path)

    async def main() -> dict[str, int]:
        async with txrpc.cluster(procs.config_path) as cluster:
            for name in ACCOUNTS:
                async with cluster.transaction() as t:
                    await t.bank.open_account(name, 100)
            victim = cluster.config.shard_map.primary_of(ACCOUNTS[0]).name
            counts = {"committed": 0, "failed": 0}
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for seed in range(4):
                    nursery.start_soon(transfers_until, cluster, stop, seed, counts)
                await more_commits(counts, 40)
                procs.kill9(victim)
                await trio.sleep(0.5)
                marked = await trio.to_thread.run_sync(txrpc_cli, "ring", "mark-down", victim, "--config", config_path)
                assert marked.returncode == 0, marked.stdout + marked.stderr
                assert "epoch 2" in marked.stdout
                await more_commits(counts, 40)
                # The victim comes back with stale data and rejoins while transfers run.
                procs.start(victim)
                await trio.to_thread.run_sync(procs.wait_ready, victim)
                joined = await trio.to_thread.run_sync(txrpc_cli, "ring", "rejoin", victim, "--config", config_path)
                assert joined.returncode == 0, joined.stdout + joined.stderr
                assert "epoch 4" in joined.stdout
                await more_commits(counts, 20)
                # A fourth node joins: listed in the file, started, added; about a quarter
                # of the copies move to it while transfers run.
                with procs.config_path.open("a") as config_file:
                    config_file.write(f'\n[[nodes]]\nname = "d"\nhost = "127.0.0.1"\nport = {free_port()}\n')
                procs.start("d")
                await trio.to_thread.run_sync(procs.wait_ready, "d")
                added = await trio.to_thread.run_sync(txrpc_cli, "ring", "add-node", "d", "--config", config_path)
                assert added.returncode == 0, added.stdout + added.stderr
                assert "epoch 6" in added.stdout
                await more_commits(counts, 20)
                stop.set()
            # Money is neither created nor destroyed, whatever the failover did to
            # transactions in flight (in-doubt ones are resolved by the new primaries).
            seen: list[Any] = []
            with trio.move_on_after(30):
                while True:
                    try:
                        seen.append(await total(cluster))
                        if seen[-1] == 100 * len(ACCOUNTS):
                            break
                    except txrpc.TransactionAborted as exc:
                        seen.append(exc)  # an in-doubt transaction still holds a lock
                    await trio.sleep(0.2)
            if not seen or seen[-1] != 100 * len(ACCOUNTS):
                explained = explain_logs(procs.config_path.parent / "data")
                raise AssertionError(f"totals seen: {seen[-5:]}; commit logs:\n{explained}")
            return counts

    counts = trio.run(main)
    assert counts["committed"] >= 100
    for _ in range(50):  # phase 2 reaches the followers just after the clients hear "committed"
        verified = txrpc_cli("ring", "verify", "--config", config_path)
        if verified.returncode == 0:
            break
        trio.run(trio.sleep, 0.2)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "every replica set agrees" in verified.stdout
    assert "epoch 6" in verified.stdout
    # Each node's commit log (its own commits, replicated ones, and the rejoined node's
    # catch-up snapshot) rebuilds exactly its committed state in an empty store.
    procs.stop()
    data = procs.config_path.parent / "data"
    for node in [*NODES, "d"]:
        rebuilt = txrpc_cli(
            "replay", "--db", str(data / node), "--shard", node, "--into", str(procs.config_path.parent / f"r-{node}")
        )
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert "the rebuilt state equals the shard's" in rebuilt.stdout
