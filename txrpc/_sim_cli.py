"""`txrpc sim` (run / explore the deterministic simulator) and `txrpc bench sim`.

Fault steps on the command line: ``KIND:NODE[-NODE][=AMOUNT]@SECONDS``, e.g.
``crash:s1@0.5``, ``restart:s1@0.9``, ``drop:c0-s0=0.05@0.5``, ``partition:s0-coordinator@1``,
``pause:s2=0.5@1.2``, ``heal@1.5``. See ``docs/testing-under-faults.md``.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console()
F = TypeVar("F", bound=Callable[..., Any])

WORKLOAD_CHOICE = click.Choice(["bank", "list-append", "idempotency"])
#: The target of ``txrpc bench sim`` (issue: thousands of schedules must fit in minutes).
TARGET_TX_PER_WALL_S = 1000.0


def parse_fault(text: str) -> Any:
    """``KIND:A[-B][=AMOUNT]@SECONDS`` (or ``heal@SECONDS``) → :class:`txrpc.testing.Fault`."""
    from .testing import FAULT_KINDS, Fault

    try:
        body, at = text.rsplit("@", 1)
        at_s = float(at)
        amount = 0.0
        if "=" in body:
            body, value = body.split("=", 1)
            amount = float(value)
        kind, _, where = body.partition(":")
        a, _, b = where.partition("-")
        return Fault(at_s, kind, a, b, amount)
    except ValueError as exc:
        raise click.BadParameter(
            f"{text!r}: {exc}. Expected KIND:NODE[-NODE][=AMOUNT]@SECONDS, e.g. crash:s1@0.5 or "
            f"drop:c0-s0=0.05@0.5; kinds: {', '.join(FAULT_KINDS)}"
        ) from None


def _result_table(result: Any) -> Table:
    table = Table(title=f"txrpc sim — {result.workload}, seed {result.seed}")
    table.add_column("check")
    table.add_column("verdict")
    table.add_column("counts")
    table.add_column("anomalies")
    for check in result.checks:
        name, _, counts, anomalies = check.row()
        table.add_row(name, "[green]valid[/]" if check.valid else "[red]INVALID[/]", counts, anomalies)
    return table


@click.group("sim")
@click.option("--log-level", default="ERROR", show_default=True, help="Log level of the simulated nodes.")
def sim(log_level: str) -> None:
    """Run workloads on the deterministic cluster simulator (one seed replays a run).

    Faults make the nodes log a lot (resets, protocol errors from duplicated frames):
    only errors are shown unless --log-level says otherwise."""
    import logging

    for name in ("txrpc", "coordinator", "storage"):
        logging.getLogger(name).setLevel(log_level.upper())


def _workload_options(clients: int, duration: float) -> Any:
    from .testing import WorkloadOptions

    return WorkloadOptions(clients=clients, duration_s=duration)


def _cluster_shape(command: F) -> F:
    """The simulated cluster's ``--shards`` and ``--replication`` options."""
    command = click.option(
        "--replication", type=click.IntRange(1, 8), default=1, show_default=True,
        help="Replication factor, at most --shards (> 1 adds the authority's faults: mark-down, rejoin, "
             "remove-node, add-node).",
    )(command)  # fmt: skip
    return click.option(
        "--shards", type=click.IntRange(1, 8), default=3, show_default=True, help="Shard nodes s0, s1, ..."
    )(command)


def _check_shape(shards: int, replication: int) -> None:
    if replication > shards:
        raise click.BadParameter(f"--replication {replication} needs at least as many --shards (got {shards})")


@sim.command("run")
@click.option("--workload", type=WORKLOAD_CHOICE, default="bank", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, envvar="TXRPC_SIM_SEED")
@click.option("--fault", "faults", multiple=True, help="A fault step (repeatable), e.g. crash:s1@0.5.")
@click.option("--duration", type=float, default=5.0, show_default=True, help="Simulated seconds of workload.")
@click.option("--clients", type=int, default=4, show_default=True)
@click.option("--crash-point", "crash_points", multiple=True, help="NAME=P, e.g. coordinator.after_decision=0.05")
@click.option("--buggify", type=float, default=0.0, show_default=True, help="Probability that a buggify point is on.")
@click.option("--broken", multiple=True, help="Turn on a test-only protocol-breaking switch (to see it caught).")
@click.option("--history", type=click.Path(dir_okay=False, path_type=Path), help="Save the history as JSON lines.")
@_cluster_shape
def sim_run(
    workload: str,
    seed: int,
    faults: tuple[str, ...],
    duration: float,
    clients: int,
    crash_points: tuple[str, ...],
    buggify: float,
    broken: tuple[str, ...],
    history: Path | None,
    shards: int,
    replication: int,
) -> None:
    """One seeded run under a fault schedule; exits 1 if a checker finds a violation."""
    from .testing import BROKEN_SWITCHES, SimOptions, run_simulation

    _check_shape(shards, replication)

    unknown = set(broken) - set(BROKEN_SWITCHES)
    if unknown:
        raise click.BadParameter(f"unknown switch {sorted(unknown)}; known: {', '.join(BROKEN_SWITCHES)}")
    points: dict[str, float] = {}
    for item in crash_points:
        name, _, p = item.partition("=")
        try:
            points[name] = float(p or "0.05")
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected NAME=PROBABILITY") from None
    options = SimOptions(
        shards=shards,
        crash_points=points,
        buggify_p=buggify,
        broken=frozenset(broken),
        replication_factor=replication,
    )
    started = time.perf_counter()
    result = run_simulation(
        seed,
        workload=workload,
        faults=[parse_fault(f) for f in faults],
        options=options,
        workload_options=_workload_options(clients, duration),
    )
    wall_s = time.perf_counter() - started
    console.print(_result_table(result))
    console.print(result.report())
    console.print(f"wall {wall_s:.1f} s for {result.simulated_s:.1f} simulated s")
    if history is not None:
        result.history.dump(history)
        console.print(f"history written to {history}")
    sys.exit(0 if result.valid else 1)


@sim.command("explore")
@click.option("--workload", type=WORKLOAD_CHOICE, default="bank", show_default=True)
@click.option("--schedules", type=int, default=50, show_default=True, help="How many random schedules to run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the schedule generator.")
@click.option("--duration", type=float, default=2.0, show_default=True)
@click.option("--faults-max", type=int, default=6, show_default=True, help="Fault steps per schedule, at most.")
@click.option("--clients", type=int, default=3, show_default=True)
@_cluster_shape
@click.option("--buggify", type=float, default=0.0, show_default=True, help="Probability that a buggify point is on.")
def sim_explore(
    workload: str,
    schedules: int,
    seed: int,
    duration: float,
    faults_max: int,
    clients: int,
    shards: int,
    replication: int,
    buggify: float,
) -> None:
    """Run many random fault schedules; print each failing seed and schedule (exit 1 if any)."""
    from .testing import SimOptions, run_simulation
    from .testing._runner import random_schedule

    _check_shape(shards, replication)
    rng = random.Random(seed)
    shard_names = tuple(f"s{i}" for i in range(shards))
    nodes = ("keyed",) if workload == "idempotency" else ("coordinator", *shard_names)
    failures = []
    crashed: list[str] = []
    ops = 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"exploring {workload}", total=schedules)
        for _ in range(schedules):
            run_seed = rng.getrandbits(32)
            names = tuple(f"c{i}" for i in range(clients))
            replicated = replication > 1 and workload != "idempotency"
            faults = random_schedule(rng, nodes, names, duration, faults_max, replicated=replicated)
            wopts = _workload_options(clients, duration)
            options = SimOptions(shards=shards, replication_factor=replication if replicated else 1, buggify_p=buggify)
            try:
                result = run_simulation(
                    run_seed, workload=workload, faults=faults, workload_options=wopts, options=options
                )
            except Exception as exc:  # a crash of the run is a finding too: say how to replay it
                steps = " ".join(f"--fault {f.cli()}" for f in faults)
                command = (
                    f"txrpc sim run --workload {workload} --seed {run_seed} --duration {duration:g} "
                    f"--clients {clients} --shards {shards} --replication {options.replication_factor} "
                    f"--buggify {buggify:g} {steps}"
                )
                console.print(f"[red]the run crashed: {type(exc).__name__}: {exc}[/]\nreplay: {command}")
                crashed.append(command)
                progress.advance(task)
                continue
            ops += sum(result.counts().values())
            if not result.valid:
                failures.append(result)
                console.print(result.report())
            progress.advance(task)
    console.print(f"{schedules} schedules, {ops} operations, {len(failures)} violations, {len(crashed)} crashed runs")
    for result in failures:
        console.print(f"replay: {result.replay_command()}")
    for command in crashed:
        console.print(f"replay (crashed): {command}")
    sys.exit(1 if failures or crashed else 0)


@click.command("sim")
@click.option("--transactions", type=int, default=2000, show_default=True, help="Cross-shard transfers per round.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Repetitions; medians are kept.")
@click.option("--clients", type=int, default=16, show_default=True)
@click.option("--latency-ms", type=float, default=0.5, show_default=True, help="One-way link latency (simulated).")
def bench_sim(transactions: int, rounds: int, clients: int, latency_ms: float) -> None:
    """Simulated cross-shard transactions per second of wall time (target ≥ 1,000)."""
    rates, speedups = [], []
    for index in range(rounds):
        rate, speedup, done = measure_sim(index, transactions, clients, latency_ms / 1000)
        rates.append(rate)
        speedups.append(speedup)
        console.print(f"round {index + 1}: {done} cross-shard transfers committed, {rate:,.0f}/s of wall time")
    table = Table(title=f"txrpc bench sim — {clients} clients, {transactions} transfers, medians of {rounds}")
    table.add_column("stack")
    table.add_column("cross-shard tx / wall s", justify="right")
    table.add_column("simulated s / wall s", justify="right")
    table.add_column("target")
    rate = statistics.median(rates)
    table.add_row(
        "txrpc simulator (production coordinator + 3 shards, SQLite)",
        f"{rate:,.0f}",
        f"{statistics.median(speedups):.3f}",
        f"{'met' if rate >= TARGET_TX_PER_WALL_S else 'missed'} (≥ {TARGET_TX_PER_WALL_S:,.0f})",
    )
    console.print(table)


def measure_sim(seed: int, transactions: int, clients: int, latency_s: float) -> tuple[float, float, int]:
    """(committed cross-shard transfers per wall second, simulated/wall time, committed) of
    one run: ``clients`` clients share ``transactions`` transfers between accounts on
    different shards (wall time of the transfers only, not of starting the cluster)."""
    import trio

    from .testing import LinkFaults, SimOptions, bank_service, simulate
    from .testing._workloads import WorkloadOptions, _transaction, bank_setup

    wopts = WorkloadOptions(clients=clients, accounts=max(64, clients * 8))

    async def main(sim: Any) -> tuple[float, float, int]:
        shard_of = sim.config.shard_map.primary_of
        async with sim.client("setup") as cluster:
            await bank_setup(cluster, wopts)
        accounts = [f"acct{i}" for i in range(wopts.accounts)]
        pairs = [(a, b) for a in accounts for b in accounts if shard_of(a).name != shard_of(b).name]
        left = [transactions]
        done = [0]

        async def client(index: int) -> None:
            rng = random.Random(index)
            async with sim.client(f"c{index}") as cluster:
                while left[0] > 0:
                    left[0] -= 1
                    source, target = rng.choice(pairs)

                    async def move(t: Any, s: str = source, d: str = target) -> None:
                        await t.bank.withdraw(s, 1)
                        await t.bank.deposit(d, 1)

                    status, _ = await _transaction(cluster, move, 5.0)
                    done[0] += status == "ok"

        started_sim = trio.current_time()
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(clients):
                nursery.start_soon(client, index)
        wall_s = time.perf_counter() - started
        return done[0] / wall_s, (trio.current_time() - started_sim) / wall_s, done[0]

    options = SimOptions(link=LinkFaults(delay_s=latency_s, jitter_s=latency_s * 0.4))
    result: tuple[float, float, int] = simulate(main, seed=seed, services=[bank_service()], options=options)
    return result


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(sim)
    bench.add_command(bench_sim)
