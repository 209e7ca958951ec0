"""Real processes on loopback, killed with SIGKILL at the protocol's edges."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import txrpc
from txrpc._demo import Processes, write_cluster_file

NODES = ["a", "b", "c"]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(write_cluster_file(tmp_path), NODES)
    try:
        yield processes
    finally:
        processes.stop()


def start_all(
    procs: Processes, crash: dict[str, str] | None = None, args: dict[str, tuple[str, ...]] | None = None
) -> None:
    for name in ["coordinator", *NODES]:
        env = {"TXRPC_CRASH_AT": crash[name]} if crash and name in crash else None
        procs.start(name, env=env, args=(args or {}).get(name, ()))
    for name in ["coordinator", *NODES]:
        procs.wait_ready(name)


def pair_on_two_shards(config: txrpc.ClusterConfig, first: str = "a", second: str = "b") -> tuple[str, str]:
    names = [f"acct{i}" for i in range(200)]
    src = next(n for n in names if config.shard_map.primary_of(n).name == first)
    dst = next(n for n in names if config.shard_map.primary_of(n).name == second)
    return src, dst


async def open_accounts(cluster: txrpc.Cluster, names: list[str], balance: int = 100) -> None:
    for name in names:
        async with cluster.transaction() as t:
            await t.bank.open_account(name, balance)


async def balance(cluster: txrpc.Cluster, name: str) -> int:
    return int(await cluster.call(name, "bank.balance", name))


def test_coordinator_killed_after_the_decision_commits_everywhere_after_restart(procs: Processes) -> None:
    start_all(procs, crash={"coordinator": "coordinator.after_decision"})

    async def main() -> None:
        async with txrpc.cluster(procs.config_path) as cluster:
            src, dst = pair_on_two_shards(cluster.config)
            await open_accounts(cluster, [src, dst])  # one-phase commits: no decision record

            async def restart_coordinator_when_it_dies() -> None:
                await trio.to_thread.run_sync(procs.wait_exit, "coordinator", 30)
                procs.start("coordinator")
                await trio.to_thread.run_sync(procs.wait_ready, "coordinator")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart_coordinator_when_it_dies)
                async with cluster.transaction() as t:
                    await t.bank.withdraw(src, 30)
                    await t.bank.deposit(dst, 30)
            # The client's commit reached the restarted coordinator, which re-drove phase 2.
            assert procs.procs["coordinator"].returncode is None
            assert t.outcome == "committed"
            with trio.fail_after(20):
                while (await balance(cluster, src), await balance(cluster, dst)) != (70, 130):
                    await trio.sleep(0.1)

    trio.run(main)
    assert procs.procs["coordinator"].poll() is None


def test_participant_killed_after_prepare_holds_locks_then_resolves(procs: Processes) -> None:
    start_all(procs, crash={"a": "participant.after_prepare"})

    async def main() -> None:
        async with txrpc.cluster(procs.config_path) as cluster:
            src, dst = pair_on_two_shards(cluster.config, "a", "b")
            await open_accounts(cluster, [src, dst])
            with pytest.raises(txrpc.TransactionAborted, match="unreachable"):
                async with cluster.transaction() as t:
                    await t.bank.withdraw(src, 30)
                    await t.bank.deposit(dst, 30)
            assert procs.wait_exit("a", 10) == -signal.SIGKILL
            # Restart shard a while the coordinator is down: it recovers the prepared
            # transaction and holds its lock, so nothing stale can be read.
            procs.kill9("coordinator")
            procs.start("a")
            await trio.to_thread.run_sync(procs.wait_ready, "a")
            with pytest.raises((txrpc.TransactionAborted, txrpc.DeadlineExceeded)):
                await cluster.router.options(timeout=1.5).call_for_key(src, "bank.balance", src)
            procs.start("coordinator")
            await trio.to_thread.run_sync(procs.wait_ready, "coordinator")
            # The termination protocol: shard a asks, learns abort (presumed), releases.
            with trio.fail_after(20):
                while True:
                    try:
                        assert await balance(cluster, src) == 100
                        break
                    except txrpc.TransactionAborted:
                        await trio.sleep(0.2)
            assert await balance(cluster, dst) == 100

    trio.run(main)


def test_lost_commit_message_is_applied_after_the_participant_restarts(procs: Processes) -> None:
    start_all(procs, crash={"a": "participant.before_commit_apply"})

    async def main() -> None:
        async with txrpc.cluster(procs.config_path) as cluster:
            src, dst = pair_on_two_shards(cluster.config, "a", "b")
            await open_accounts(cluster, [src, dst])
            async with cluster.transaction() as t:  # committed: the decision is durable
                await t.bank.withdraw(src, 30)
                await t.bank.deposit(dst, 30)
            assert t.outcome == "committed"
            assert procs.wait_exit("a", 10) == -signal.SIGKILL  # died with the commit unapplied
            procs.start("a")
            await trio.to_thread.run_sync(procs.wait_ready, "a")
            with trio.fail_after(20):
                while True:
                    try:
                        if await balance(cluster, src) == 70:
                            break
                    except (txrpc.TransactionAborted, txrpc.Unavailable):
                        pass
                    await trio.sleep(0.2)
            assert await balance(cluster, dst) == 130
            with trio.fail_after(20):  # phase 2 at the coordinator completes too (acknowledged)
                while True:
                    info = await cluster.coordinator.call("coord.show", t.txid)
                    if info.get("record", {}).get("done"):
                        break
                    await trio.sleep(0.2)
            assert sorted(info["record"]["acked"]) == ["a", "b"]

    trio.run(main)


CLIENT_THAT_DIES = textwrap.dedent(
    """
    import os, signal, sys, trio, txrpc
    async def main():
        async with txrpc.cluster(sys.argv[1]) as cluster:
            t = cluster.transaction()
            await t.__aenter__()
            await t.bank.deposit(sys.argv[2], 5)
            print("holding", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    trio.run(main)
    """
)


def test_client_killed_mid_transaction_locks_freed_after_idle_timeout(
    procs: Processes, tmp_path: Path
) -> None:
    start_all(procs, args={n: ("--idle-timeout", "1") for n in NODES})

    async def setup() -> str:
        async with txrpc.cluster(procs.config_path) as cluster:
            src, _ = pair_on_two_shards(cluster.config)
            await open_accounts(cluster, [src])
            return src

    src = trio.run(setup)
    script = tmp_path / "dying_client.py"
    script.write_text(CLIENT_THAT_DIES)
    out = subprocess.run(
        [sys.executable, str(script), str(procs.config_path), src], capture_output=True, text=True, timeout=60
    )
    assert "holding" in out.stdout and out.returncode == -signal.SIGKILL

    async def after() -> None:
        async with txrpc.cluster(procs.config_path) as cluster:

            async def withdraw(t: txrpc.Transaction) -> None:
                await t.bank.withdraw(src, 100)

            with trio.fail_after(20):
                await cluster.run_transaction(withdraw, attempts=200)
            assert await balance(cluster, src) == 0  # the dead client's deposit never happened

    trio.run(after)


def test_heuristic_resolve_by_an_operator(procs: Processes) -> None:
    start_all(procs)
    config = str(procs.config_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "txrpc.cli", *args], capture_output=True, text=True, timeout=60
        )

    async def main() -> None:
        async with txrpc.cluster(procs.config_path) as cluster:
            src, _ = pair_on_two_shards(cluster.config)
            await open_accounts(cluster, [src])
            # A transaction prepared on shard a that the coordinator never heard of (its
            # record lost, say): shard a is in doubt and keeps the lock.
            stray = 10**9
            node = cluster.config.shard_map.primary_of(src)
            async with txrpc.connect(*node.address) as raw:
                meta = {"txid": stray, "op_seq": 1, "epoch": cluster.config.shard_map.epoch}
                await raw.options(metadata=meta).call("bank.deposit", src, 7)
                assert (await raw.call("tx.prepare", stray))["vote"] == "yes"
            out = await trio.to_thread.run_sync(
                cli, "tx", "resolve", "--config", config, str(stray), "--commit"
            )
            assert out.returncode == 0, out.stderr
            assert "heuristic commit recorded" in out.stdout
            again = await trio.to_thread.run_sync(
                cli, "tx", "resolve", "--config", config, str(stray), "--abort"
            )
            assert again.returncode == 1 and "already has the decision" in again.stderr
            with trio.fail_after(20):  # the in-doubt participant asks and adopts the decision
                while True:
                    try:
                        if await balance(cluster, src) == 107:
                            break
                    except txrpc.TransactionAborted:
                        pass
                    await trio.sleep(0.2)
            shown = await trio.to_thread.run_sync(cli, "tx", "show", "--config", config, str(stray))
            assert '"heuristic": true' in shown.stdout

    trio.run(main)
