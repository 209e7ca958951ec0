"""`txrpc sim` (run / explore the deterministic simulator) and `txrpc bench sim`.

Fault steps on the command line: ``KIND:NODE[-NODE][=AMOUNT]@SECONDS``, e.g.
``crash:s1@0.5``, ``restart:s1@0.9``, ``drop:c0-s0=0.05@0.5``, ``partition:s0-coordinator@1``,
``pause:s2=0.5@1.2``, ``heal@1.5``. See ``docs/testing-under-faults.md``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
#: How long ``txrpc bench sim`` waits for a simulation running side by side.
SIDE_BY_SIDE_TIMEOUT_S = 600.0


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


def _default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _mp_context() -> Any:
    """fork on Linux (fast, and the workers keep this process's hash seed, so a schedule
    runs exactly as it would here); spawn elsewhere (fork is unsafe on macOS)."""
    import multiprocessing

    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _pool(workers: int, log_level: int) -> concurrent.futures.ProcessPoolExecutor:
    """Processes for independent simulations (each one ``trio.run`` with its own seed).
    Create it before any thread starts (a progress bar's): the workers are forked."""
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=_mp_context(), initializer=_worker_init, initargs=(log_level,)
    )


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Ctrl-C: drop what is queued and stop the workers now (they ignore SIGINT, so a
    run in progress would otherwise finish first), then remove the data directories
    of the runs they were in (SIGTERM skips ``simulate``'s ``finally``)."""
    from .testing._sim import sweep_stale_sim_dirs

    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
    sweep_stale_sim_dirs()


def _worker_init(log_level: int) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what a Ctrl-C stops
    for name in ("txrpc", "coordinator", "storage"):
        logging.getLogger(name).setLevel(log_level)


@dataclass
class _Schedule:
    """One schedule of ``sim explore`` (drawn up front, so workers do not change them)."""

    workload: str
    seed: int
    faults: Sequence[Any]
    clients: int
    duration_s: float
    shards: int
    replication: int
    buggify: float

    def replay(self) -> str:
        steps = " ".join(f"--fault {f.cli()}" for f in self.faults)
        return (
            f"txrpc sim run --workload {self.workload} --seed {self.seed} --duration {self.duration_s:g} "
            f"--clients {self.clients} --shards {self.shards} --replication {self.replication} "
            f"--buggify {self.buggify:g} {steps}"
        )


def _run_schedule(schedule: _Schedule) -> dict[str, Any]:
    """Run one schedule (in this process or a worker): what ``explore`` prints of it."""
    from .testing import SimOptions, run_simulation

    options = SimOptions(shards=schedule.shards, replication_factor=schedule.replication, buggify_p=schedule.buggify)
    try:
        result = run_simulation(
            schedule.seed,
            workload=schedule.workload,
            faults=schedule.faults,
            workload_options=_workload_options(schedule.clients, schedule.duration_s),
            options=options,
        )
    except Exception as exc:  # a crash of the run is a finding too: say how to replay it
        return {"crashed": f"{type(exc).__name__}: {exc}", "replay": schedule.replay()}
    return {
        "ops": sum(result.counts().values()),
        "valid": result.valid,
        "report": "" if result.valid else result.report(),
        "replay": result.replay_command(),
    }


@sim.command("explore")
@click.option("--workload", type=WORKLOAD_CHOICE, default="bank", show_default=True)
@click.option("--schedules", type=int, default=50, show_default=True, help="How many random schedules to run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the schedule generator.")
@click.option("--duration", type=float, default=2.0, show_default=True)
@click.option("--faults-max", type=int, default=6, show_default=True, help="Fault steps per schedule, at most.")
@click.option("--clients", type=int, default=3, show_default=True)
@_cluster_shape
@click.option("--buggify", type=float, default=0.0, show_default=True, help="Probability that a buggify point is on.")
@click.option(
    "--workers", type=click.IntRange(1, 256), default=None,
    help="Processes running schedules side by side  [default: one per CPU]",
)  # fmt: skip
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
    workers: int | None,
) -> None:
    """Run many random fault schedules; print each failing seed and schedule (exit 1 if any).

    The schedules are drawn from --seed up front, so they are the same whatever
    --workers is; each runs in one process and replays alone from its seed."""
    from .testing._runner import random_schedule

    _check_shape(shards, replication)
    rng = random.Random(seed)
    shard_names = tuple(f"s{i}" for i in range(shards))
    nodes = ("keyed",) if workload == "idempotency" else ("coordinator", *shard_names)
    replicated = replication > 1 and workload != "idempotency"
    names = tuple(f"c{i}" for i in range(clients))
    plan = []
    for _ in range(schedules):
        run_seed = rng.getrandbits(32)
        faults = random_schedule(rng, nodes, names, duration, faults_max, replicated=replicated)
        plan.append(
            _Schedule(workload, run_seed, faults, clients, duration, shards, replication if replicated else 1, buggify)
        )
    workers = min(workers or _default_workers(), max(1, schedules))
    failures: list[str] = []
    crashed: list[str] = []
    ops = 0
    started = time.perf_counter()
    pool = None
    outcomes: Iterator[dict[str, Any]]
    try:
        if workers == 1:
            outcomes = map(_run_schedule, plan)
        else:
            pool = _pool(workers, logging.getLogger("txrpc").getEffectiveLevel())
            outcomes = pool.map(_run_schedule, plan)  # forks the workers now, before the progress bar's thread
        with Progress(console=console, transient=True) as progress:
            plural = "s" if workers > 1 else ""
            task = progress.add_task(f"exploring {workload} ({workers} worker{plural})", total=schedules)
            for outcome in outcomes:  # in schedule order, whichever worker ran it
                if "crashed" in outcome:
                    console.print(f"[red]the run crashed: {outcome['crashed']}[/]\nreplay: {outcome['replay']}")
                    crashed.append(outcome["replay"])
                else:
                    ops += outcome["ops"]
                    if not outcome["valid"]:
                        failures.append(outcome["replay"])
                        console.print(outcome["report"])
                progress.advance(task)
    except KeyboardInterrupt:  # (also while the pool forks its workers)
        if pool is not None:
            _stop_pool(pool)
        raise
    if pool is not None:
        pool.shutdown()
    console.print(
        f"{schedules} schedules, {ops} operations, {len(failures)} violations, {len(crashed)} crashed runs "
        f"({time.perf_counter() - started:.1f} s, {workers} worker{'s' if workers > 1 else ''})"
    )
    for command in failures:
        console.print(f"replay: {command}")
    for command in crashed:
        console.print(f"replay (crashed): {command}")
    sys.exit(1 if failures or crashed else 0)


@click.command("sim")
@click.option("--transactions", type=int, default=2000, show_default=True, help="Cross-shard transfers per round.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Repetitions; medians are kept.")
@click.option("--clients", type=int, default=16, show_default=True)
@click.option("--latency-ms", type=float, default=0.5, show_default=True, help="One-way link latency (simulated).")
@click.option(
    "--workers", type=click.IntRange(1, 256), default=None,
    help="Simulations side by side for the second row (as `txrpc sim explore` runs them)  [default: one per CPU]",
)  # fmt: skip
def bench_sim(transactions: int, rounds: int, clients: int, latency_ms: float, workers: int | None) -> None:
    """Simulated cross-shard transactions per second of wall time (target ≥ 1,000): one
    simulation in one process, then --workers simulations side by side (what `txrpc sim
    explore` does with its schedules)."""
    workers = workers or _default_workers()
    latency_s = latency_ms / 1000
    single: list[SimMeasure] = []
    for index in range(rounds):
        m = measure_sim(index, transactions, clients, latency_s)
        single.append(m)
        console.print(f"round {index + 1}, one process: {m.done} committed, {m.rate:,.0f}/s of wall time")
    parallel: list[tuple[float, float]] = []  # (tx per wall s, simulated s per wall s) of all workers together
    for index in range(rounds if workers > 1 else 0):
        seeds = [1000 + index * workers + w for w in range(workers)]
        runs = _measure_side_by_side(seeds, transactions, clients, latency_s)
        wall_s = max(r.wall_end for r in runs) - min(r.wall_start for r in runs)
        done = sum(r.done for r in runs)
        parallel.append((done / wall_s, sum(r.simulated_s for r in runs) / wall_s))
        console.print(
            f"round {index + 1}, {workers} processes: {done} committed, {done / wall_s:,.0f}/s of wall time "
            f"(each {', '.join(f'{r.rate:,.0f}' for r in runs)}/s)"
        )
    table = Table(
        title=f"txrpc bench sim — {clients} clients, {transactions} transfers per simulation, medians of {rounds}"
    )
    table.add_column("stack")
    table.add_column("cross-shard tx / wall s", justify="right")
    table.add_column("simulated s / wall s", justify="right")
    table.add_column("target")

    def verdict(rate: float) -> str:
        return f"{'met' if rate >= TARGET_TX_PER_WALL_S else 'missed'} (≥ {TARGET_TX_PER_WALL_S:,.0f})"

    rate = statistics.median(m.rate for m in single)
    table.add_row(
        "txrpc simulator, one process (production coordinator + 3 shards, SQLite)",
        f"{rate:,.0f}",
        f"{statistics.median(m.simulated_s / (m.wall_end - m.wall_start) for m in single):.3f}",
        verdict(rate),
    )
    if parallel:
        rate = statistics.median(p[0] for p in parallel)
        table.add_row(
            f"{workers} simulations side by side ({workers} processes, {os.cpu_count()} CPUs)",
            f"{rate:,.0f}",
            f"{statistics.median(p[1] for p in parallel):.3f}",
            verdict(rate),
        )
    console.print(table)


@dataclass
class SimMeasure:
    """One simulation of ``txrpc bench sim``: transfers committed in its transfer phase,
    that phase's start and end (``time.perf_counter``, comparable across processes on
    one machine) and the simulated seconds it covered."""

    done: int
    wall_start: float
    wall_end: float
    simulated_s: float

    @property
    def rate(self) -> float:
        return self.done / (self.wall_end - self.wall_start)


def _measure_side_by_side(seeds: list[int], transactions: int, clients: int, latency_s: float) -> list[SimMeasure]:
    """One simulation per seed, each in its own process; their transfers start together
    (a barrier after every cluster is set up), so the rounds' wall times overlap."""
    from .testing._sim import sweep_stale_sim_dirs

    context = _mp_context()
    barrier = context.Barrier(len(seeds))
    results = context.Queue()
    processes = [
        context.Process(
            target=_measure_in_worker, args=(seed, transactions, clients, latency_s, barrier, results), daemon=True
        )
        for seed in seeds
    ]
    for process in processes:
        process.start()
    try:
        runs = [results.get(timeout=SIDE_BY_SIDE_TIMEOUT_S) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        sweep_stale_sim_dirs()  # of the ones terminated
    failed = [r for r in runs if isinstance(r, str)]
    if failed:
        raise click.ClickException(f"a simulation failed: {failed[0]}")
    return runs


def _measure_in_worker(
    seed: int, transactions: int, clients: int, latency_s: float, barrier: Any, results: Any
) -> None:
    _worker_init(logging.ERROR)  # as `txrpc sim`
    try:
        results.put(
            measure_sim(seed, transactions, clients, latency_s, before_transfers=lambda: barrier.wait(timeout=300))
        )
    except BaseException as exc:
        barrier.abort()  # the others stop waiting for this one
        results.put(f"seed {seed}: {type(exc).__name__}: {exc}")


def measure_sim(
    seed: int,
    transactions: int,
    clients: int,
    latency_s: float,
    before_transfers: Callable[[], Any] | None = None,
    same_shard: bool = False,
    replication_factor: int = 1,
) -> SimMeasure:
    """One run: ``clients`` clients share ``transactions`` transfers between accounts on
    different shards (``same_shard``: on one shard, committed in one phase) (timed: the
    transfers only, not starting the cluster; the cluster waits in ``before_transfers``,
    if given, before they start). ``replication_factor``: copies of each partition."""
    import trio

    from .testing import LinkFaults, SimOptions, bank_service, simulate
    from .testing._workloads import WorkloadOptions, _transaction, bank_setup

    wopts = WorkloadOptions(clients=clients, accounts=max(64, clients * 8))

    async def main(sim: Any) -> SimMeasure:
        shard_of = sim.config.shard_map.primary_of
        async with sim.client("setup") as cluster:
            await bank_setup(cluster, wopts)
        accounts = [f"acct{i}" for i in range(wopts.accounts)]
        node_of = {a: shard_of(a).name for a in accounts}
        pairs = [(a, b) for a in accounts for b in accounts if a != b and (node_of[a] == node_of[b]) == same_shard]
        left = [transactions]
        done = [0]
        if before_transfers is not None:
            before_transfers()  # blocks the whole simulation: its clock stands still meanwhile

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
        return SimMeasure(done[0], started, time.perf_counter(), trio.current_time() - started_sim)

    options = SimOptions(
        link=LinkFaults(delay_s=latency_s, jitter_s=latency_s * 0.4), replication_factor=replication_factor
    )
    result: SimMeasure = simulate(main, seed=seed, services=[bank_service()], options=options)
    return result


def register(cli: click.Group, bench: click.Group) -> None:
    cli.add_command(sim)
    bench.add_command(bench_sim)
