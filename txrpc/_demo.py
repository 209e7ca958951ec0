"""`txrpc demo`: a real local cluster — a coordinator and three shard processes on SQLite
in a temporary directory — running concurrent cross-shard bank transfers."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._cluster import Cluster, Transaction, cluster
from ._errors import OutcomeUnknown, TransactionAborted
from ._security import use_credentials
from ._shardmap import load_cluster_config

BANK_SERVICE = Path(__file__).resolve().parent.parent / "examples" / "bank" / "service.py"
START_TIMEOUT_S = 30.0
INITIAL_BALANCE = 1000


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_cluster_file(directory: Path, nodes: int = 3, *, tls: bool = False, replication_factor: int = 1) -> Path:
    """A cluster file for a local cluster in ``directory``; with ``tls``, a dev CA and
    certificates for every process, the client and an admin (``directory/certs``), and a
    ``[security]`` table: mutual TLS on every connection."""
    ports = _free_ports(nodes + 1)
    lines = [
        "[cluster]",
        f"replication_factor = {replication_factor}",
        "partitions = 1024",
        'data_dir = "data"',
        f'services = ["{BANK_SERVICE}:bank"]',
        "",
        "[coordinator]",
        'host = "127.0.0.1"',
        f"port = {ports[0]}",
        "",
    ]
    for index in range(nodes):
        lines += [
            "[[nodes]]",
            f'name = "{"abcdefgh"[index]}"',
            'host = "127.0.0.1"',
            f"port = {ports[index + 1]}",
            "",
        ]
    if tls:
        from ._certs import make_dev_certs

        names = ["coordinator", *("abcdefgh"[index] for index in range(nodes)), "client", "admin"]
        make_dev_certs(directory / "certs", names, days=1)
        lines += [
            "[security]",
            'ca_file = "certs/ca.pem"',
            'certs_dir = "certs"',
            'client_cert = "require"',
            'token_secret_file = "certs/token.secret"',
            "",
        ]
    path = directory / "cluster.toml"
    path.write_text("\n".join(lines))
    return path


class Processes:
    """The cluster's processes; stopped (SIGTERM, then SIGKILL) on exit, Ctrl-C included."""

    def __init__(self, config_path: Path, nodes: list[str]) -> None:
        self.config_path = config_path
        self.nodes = nodes
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, name: str, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        """Start ``name`` (``coordinator`` or a node); ``env`` adds environment variables."""
        argv = [sys.executable, "-m", "txrpc.cli"]
        if name == "coordinator":
            argv += ["coordinator", "--config", str(self.config_path)]
        else:
            argv += ["shard", "--config", str(self.config_path), "--node", name]
        argv += list(args)
        with open(self.config_path.parent / f"{name}.log", "a") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})}
            )

    def wait_ready(self, name: str) -> None:
        proc = self.procs[name]
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "ready" in line:
                return
            if proc.poll() is not None:
                log = (self.config_path.parent / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log}")
        raise RuntimeError(f"{name} did not start within {START_TIMEOUT_S} s")

    def kill9(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def wait_exit(self, name: str, timeout_s: float) -> int:
        """Wait for ``name`` to exit (e.g. at a crash point); its exit status."""
        return self.procs[name].wait(timeout=timeout_s)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_bank_demo(
    console: Console,
    transfers: int,
    concurrency: int,
    accounts: int,
    seed: int,
    *,
    tls: bool = False,
    replication_factor: int = 3,
) -> int:
    """Returns the process exit status (0 = the conservation check passed). With ``tls``
    every connection is mutual TLS with certificates from a fresh dev CA."""
    if not BANK_SERVICE.exists():
        console.print(f"[red]txrpc demo needs {BANK_SERVICE} (a source checkout of txrpc)[/]")
        return 2
    with tempfile.TemporaryDirectory(prefix="txrpc-demo-") as tmp:
        config_path = write_cluster_file(Path(tmp), tls=tls, replication_factor=replication_factor)
        nodes = ["a", "b", "c"]
        processes = Processes(config_path, nodes)
        try:
            with console.status("starting a coordinator and 3 shard processes (SQLite, fsync on commit)…"):
                for name in ["coordinator", *nodes]:
                    processes.start(name)
                for name in ["coordinator", *nodes]:
                    processes.wait_ready(name)
            console.print(
                f"[bold]txrpc demo[/] — cluster up in {tmp}: coordinator + shards {', '.join(nodes)}, "
                f"replication factor {replication_factor}"
                + (" (commits durable on every replica before acknowledged)" if replication_factor > 1 else "")
                + (" (mutual TLS: every process and the client present certificates from a dev CA)" if tls else "")
            )
            return trio.run(
                _workload, console, config_path, processes, transfers, concurrency, accounts, seed
            )
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the cluster[/]")
            return 130
        finally:
            processes.stop()
            console.print("cluster stopped; temporary files removed")


async def _workload(
    console: Console,
    config_path: Path,
    processes: Processes,
    transfers: int,
    concurrency: int,
    accounts: int,
    seed: int,
) -> int:
    rng = random.Random(seed)
    config = load_cluster_config(config_path)
    credentials = None if config.security is None else config.security.credentials_for()
    with use_credentials(credentials):
        return await _transfers(console, config_path, processes, transfers, concurrency, accounts, rng, seed)


async def _transfers(
    console: Console,
    config_path: Path,
    processes: Processes,
    transfers: int,
    concurrency: int,
    accounts: int,
    rng: random.Random,
    seed: int,
) -> int:
    async with cluster(config_path, rng=random.Random(seed)) as c:
        names = [f"acct{i:03d}" for i in range(accounts)]
        shard_of = {n: c.config.shard_map.primary_of(n).name for n in names}

        async def open_one(name: str) -> None:
            async with c.transaction() as t:
                await t.bank.open_account(name, INITIAL_BALANCE)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(open_one, name)
        spread = {
            node: sum(1 for n in names if shard_of[n] == node) for node in sorted(set(shard_of.values()))
        }
        console.print(f"opened {accounts} accounts × {INITIAL_BALANCE} (per shard: {spread})")

        latencies: list[float] = []
        attempts = {"attempts": 0, "committed": 0, "insufficient": 0, "unknown": 0}
        cross = [(a, b) for a in names for b in names if shard_of[a] != shard_of[b]]
        todo = [(*rng.choice(cross), rng.randint(1, 50)) for _ in range(transfers)]
        started = time.perf_counter()
        with Progress(
            TextColumn("cross-shard transfers"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("transfers", total=transfers)

            async def worker(jobs: list[tuple[str, str, int]]) -> None:
                for src, dst, amount in jobs:

                    async def transfer(t: Transaction) -> None:
                        attempts["attempts"] += 1
                        await t.bank.withdraw(src, amount)
                        await t.bank.deposit(dst, amount)

                    t0 = time.perf_counter()
                    try:
                        await c.run_transaction(transfer, attempts=50)
                        attempts["committed"] += 1
                        latencies.append(time.perf_counter() - t0)
                    except TransactionAborted as exc:
                        if exc.retryable:
                            raise
                        attempts["insufficient"] += 1
                    except OutcomeUnknown:
                        attempts["unknown"] += 1
                    progress.advance(task)

            async with trio.open_nursery() as nursery:
                for k in range(concurrency):
                    nursery.start_soon(worker, todo[k::concurrency])
        elapsed = time.perf_counter() - started
        balances = await _balances(c, names)
        total = sum(balances.values())
        expected = INITIAL_BALANCE * accounts
        latencies.sort()
        retries = attempts["attempts"] - attempts["committed"] - attempts["insufficient"]
        table = Table(
            title=f"{transfers} transfers, {concurrency} concurrent clients, each touching 2 of 3 shards"
        )
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("committed", f"{attempts['committed']:,}")
        table.add_row("aborted by the bank (insufficient funds)", f"{attempts['insufficient']:,}")
        table.add_row("outcome unknown", f"{attempts['unknown']:,}")
        table.add_row("throughput", f"{attempts['committed'] / elapsed:,.0f} transfers/s")
        table.add_row(
            "conflict aborts retried (wait-die)",
            f"{retries:,} ({retries / max(1, attempts['attempts']):.1%} of attempts)",
        )
        if latencies:
            table.add_row(
                "latency p50 / p99",
                f"{latencies[len(latencies) // 2] * 1e3:.1f} / {latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms",
            )
        table.add_row("money before / after", f"{expected:,} / {total:,}")
        negative = [n for n, b in balances.items() if b < 0]
        table.add_row(
            "conservation check",
            "[green]total conserved, no negative balance[/]"
            if total == expected and not negative
            else "[red]VIOLATED[/]",
        )
        agree = await _replicas_agree(c)
        if agree is not None:
            table.add_row("replica digests (txrpc ring verify)", agree[1])
        console.print(table)
        ok = total == expected and not negative and (agree is None or agree[0])
        return 0 if ok else 1


async def _replicas_agree(c: Cluster) -> tuple[bool, str] | None:
    """Every node's per-partition digests, compared per replica set (None at R = 1).
    Phase 2 reaches the followers just after the clients hear "committed": retried
    briefly until nothing is in doubt."""
    from ._cluster import replicas_in_doubt
    from ._ring_cli import compare_digests

    shard_map = c.router.shard_map
    if shard_map.replication_factor == 1:
        return None
    report = None
    with trio.move_on_after(10):
        while True:
            shard_map, replies = await c.replica_digests()
            report = compare_digests(shard_map, replies)
            if not report.differences and not replicas_in_doubt(replies):
                copies = shard_map.replication_factor
                return True, f"[green]{report.partitions_compared} partitions × {copies} replicas agree[/]"
            await trio.sleep(0.2)
    differing = len(report.differences) if report is not None else "?"
    return False, f"[red]{differing} partitions differ between replicas[/]"


async def _balances(c: Cluster, names: list[str]) -> dict[str, int]:
    """Read every balance in one read-only transaction (a consistent snapshot)."""
    async with c.transaction() as t:
        return {name: await t.bank.balance(name) for name in names}


def run_calculator_demo(console: Console, calls: int) -> None:  # kept for `txrpc demo --calculator`
    from ._calculator_demo import run

    run(console, calls)
