"""`txrpc bench idempotency`: what the request log costs, measured beside its peers.

Three configurations in one run, each with its server and its client in two
separate processes on loopback and a fresh SQLite database (WAL,
``synchronous=FULL``) in a temporary directory:

- ``no key``: the same calls without an idempotency key (the log is open but unused);
- ``key, group commit``: every call carries a fresh key, the log writes through the
  group-commit appender as ``txrpc serve --db`` opens it
  (``open_storage(...)``: batches written inline, the WAL flushed in each commit);
- ``key, no group commit``: the same with one transaction (one fsync) per record
  (``batching=False``).

The client keeps ``callers`` concurrent callers busy on ONE connection for a fixed
time and reports calls/s and p50/p99 latency; rounds are interleaved and medians kept.
Targets: keyed >= 0.35x the unkeyed calls/s, and >= 5x the keyed calls/s without group
commit. Mounted as ``txrpc bench idempotency``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click

from ._bench_rpc import _free_port, _run_client, _wait_ready

CONFIGS: tuple[tuple[str, bool, bool], ...] = (
    # (name, keyed, batching)
    ("no key", False, True),
    ("key, group commit", True, True),
    ("key, no group commit", True, False),
)
TARGET_VS_UNKEYED = 0.35
TARGET_VS_UNBATCHED = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    config: str
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    executions: int = 0


def _server_main(port: int, db: str, batching: bool) -> None:
    import trio

    import storage
    import txrpc
    from txrpc._serve import freeze_startup_heap

    calc = txrpc.Service()

    @calc.method
    async def add(a: int, b: int) -> int:
        return a + b

    async def main() -> None:
        async with storage.open_storage(db, batching=batching) as st:
            server = txrpc.Server(calc, request_log=st)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_tcp, "127.0.0.1", port)
                freeze_startup_heap()  # as `txrpc serve` does once it serves
                print("ready", flush=True)

    trio.run(main)


def _client_main(port: int, callers: int, seconds: float, keyed: bool) -> None:
    import random

    import trio

    import txrpc

    async def main() -> None:
        async with txrpc.connect("127.0.0.1", port, rng=random.Random(os.getpid())) as client:
            caller: Any = client.options(idempotent=True) if keyed else client
            for _ in range(20):
                assert await caller.add(1, 2) == 3
            lat: list[float] = []
            clock = time.perf_counter
            stop = clock() + seconds

            async def worker() -> None:
                while clock() < stop:
                    t = clock()
                    assert await caller.add(1, 2) == 3
                    lat.append(clock() - t)

            t0 = clock()
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(worker)
            print(json.dumps({"calls": len(lat), "elapsed": clock() - t0, "lat": sorted(lat)}))

    trio.run(main)


def _summarise(config: str, raw: dict[str, Any]) -> Measurement:
    lat = raw["lat"]
    p50 = lat[len(lat) // 2] * 1e3 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else float("nan")
    return Measurement(config, raw["calls"] / raw["elapsed"], p50, p99, raw["calls"])


def run(
    callers: int, seconds: float, rounds: int, progress: Callable[[], None] | None = None
) -> list[Measurement]:
    """Every configuration ``rounds`` times, interleaved; medians per configuration."""
    python = sys.executable
    module = "txrpc._bench_idempotency"
    samples: dict[str, list[Measurement]] = {name: [] for name, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="txrpc-bench-idem-") as work:
        servers: dict[str, tuple[subprocess.Popen[str], int]] = {}
        try:
            for name, _keyed, batching in CONFIGS:
                port = _free_port()
                db = os.path.join(work, name.replace(" ", "_").replace(",", ""))
                os.mkdir(db)
                argv = [python, "-m", module, "server", str(port), db, "1" if batching else "0"]
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
                servers[name] = (proc, port)
                _wait_ready(proc)
            for _ in range(rounds):
                for name, keyed, _batching in CONFIGS:
                    _, port = servers[name]
                    argv = [
                        python,
                        "-m",
                        module,
                        "client",
                        str(port),
                        str(callers),
                        str(seconds),
                        "1" if keyed else "0",
                    ]
                    samples[name].append(_summarise(name, _run_client(argv)))
                    if progress is not None:
                        progress()
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return [
        Measurement(
            name,
            statistics.median(m.calls_per_s for m in ms),
            statistics.median(m.p50_ms for m in ms),
            statistics.median(m.p99_ms for m in ms),
            sum(m.calls for m in ms),
        )
        for name, ms in samples.items()
    ]


@click.command("idempotency")
@click.option("--seconds", default=3.0, show_default=True, help="Duration of each measurement.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved repetitions; medians are kept.")
@click.option("--callers", default=64, show_default=True, help="Concurrent callers on one connection.")
def idempotency(seconds: float, rounds: int, callers: int) -> None:
    """Calls with a fresh idempotency key each vs. the same calls without keys, and vs.
    keys without group commit (SQLite synchronous=FULL, server and client in separate
    processes)."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("measuring", total=rounds * len(CONFIGS))
        results = run(callers, seconds, rounds, progress=lambda: bar.advance(task))
    by_name = {m.config: m for m in results}
    unkeyed = by_name["no key"].calls_per_s
    unbatched = by_name["key, no group commit"].calls_per_s
    table = Table(
        title=f"txrpc bench idempotency — medians of {rounds} x {seconds:g} s, {callers} callers, "
        "one connection, SQLite synchronous=FULL"
    )
    for column in (
        "configuration",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "vs no key",
        "vs no group commit",
        "target",
    ):
        table.add_column(column, justify="left" if column in ("configuration", "target") else "right")
    for m in results:
        vs_unkeyed = m.calls_per_s / unkeyed if unkeyed else float("nan")
        vs_unbatched = m.calls_per_s / unbatched if unbatched else float("nan")
        target = ""
        if m.config == "key, group commit":
            met_a = vs_unkeyed >= TARGET_VS_UNKEYED
            met_b = vs_unbatched >= TARGET_VS_UNBATCHED
            target = (
                f"{'[green]met' if met_a else '[red]missed'}[/] (>={TARGET_VS_UNKEYED:g}x no key), "
                f"{'[green]met' if met_b else '[red]missed'}[/] (>={TARGET_VS_UNBATCHED:g}x no group commit)"
            )
        table.add_row(
            m.config,
            f"{m.calls_per_s:,.0f}",
            f"{m.p50_ms:.2f}",
            f"{m.p99_ms:.2f}",
            f"{vs_unkeyed:.2f}x",
            f"{vs_unbatched:.2f}x",
            target,
        )
    console.print(table)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    role = sys.argv[1]
    if role == "server":
        _server_main(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1")
    elif role == "client":
        _client_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1")
    else:
        raise SystemExit(f"unknown role {role!r}")
