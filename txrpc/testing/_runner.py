"""Fault schedules as data, and one simulated run of a workload under a schedule.

A schedule is a tuple of :class:`Fault` steps (``at_s`` simulated seconds after the
workload starts). :func:`run_simulation` runs the workload's clients and a nemesis that
applies the steps, then heals everything, restarts what is down, waits for in-doubt
transactions to be decided, takes a final read and runs the checkers. The
:class:`SimResult` says what was found and how to replay it (the seed and the schedule
reproduce the run exactly). :func:`fault_schedules` is the Hypothesis strategy that
generates schedules, so failures shrink to a minimal one.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

import txrpc
from txrpc._cluster import digest_table, replicas_in_doubt

from ._checkers import (
    CheckResult,
    check_bank,
    check_idempotency,
    check_list_append,
    check_replica_consistency,
    check_termination,
)
from ._history import History
from ._sim import COORDINATOR, SimOptions, Simulation, replay_hint, simulate
from ._workloads import (
    KEYED_SERVER,
    WorkloadOptions,
    bank_client,
    bank_final_read,
    bank_service,
    bank_setup,
    counter_service,
    keyed_client,
    list_append_client,
    list_append_final_read,
    list_append_service,
    record_executions,
)

log = logging.getLogger("txrpc.testing")
WORKLOADS = ("bank", "list-append", "idempotency")
LINK_FAULTS = ("drop", "duplicate", "reorder", "reset", "slow")
#: Fault kinds a schedule can hold. ``a``/``b`` are node names; ``amount`` is a
#: probability (drop/duplicate/reorder/reset/slow), seconds (delay, pause, skew).
FAULT_KINDS = (
    "crash",
    "restart",
    "partition",
    "partition-one-way",
    "isolate",
    "drop",
    "delay",
    "duplicate",
    "reorder",
    "reset",
    "slow",
    "pause",
    "skew",
    "heal",
    "mark-down",
    "rejoin",
    "remove-node",
    "add-node",
)
#: Fault kinds that only make sense with replication (they ask the shard-map authority):
#: `txrpc ring mark-down | rejoin | remove-node | add-node NODE`. A node removed keeps
#: running (empty of its partitions) and can be added back.
REPLICA_FAULTS = ("mark-down", "rejoin", "remove-node", "add-node")


@dataclass(frozen=True)
class Fault:
    at_s: float
    kind: str
    a: str = ""
    b: str = ""
    amount: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(FAULT_KINDS)}")

    def cli(self) -> str:
        """The ``--fault`` form: ``KIND:A[-B][=AMOUNT]@SECONDS``."""
        where = "-".join(x for x in (self.a, self.b) if x)
        amount = f"={self.amount:g}" if self.amount else ""
        return f"{self.kind}{':' + where if where else ''}{amount}@{self.at_s:g}"

    def __str__(self) -> str:
        where = " ".join(x for x in (self.a, self.b) if x)
        amount = f" {self.amount:g}" if self.amount else ""
        return f"@{self.at_s:.2f}s {self.kind} {where}{amount}".rstrip()


async def apply_fault(sim: Simulation, fault: Fault) -> None:
    """Apply one fault step now."""
    kind, a, b, amount = fault.kind, fault.a, fault.b, fault.amount
    net = sim.network
    if kind == "crash":
        sim.crash(a, why="schedule")
    elif kind == "restart":
        if a in sim.down:
            await sim.restart(a)
    elif kind == "partition":
        net.partition(a, b)
    elif kind == "partition-one-way":
        net.partition(a, b, one_way=True)
    elif kind == "isolate":
        for other in [COORDINATOR, *sim.shard_names, *sim.client_names]:
            if other != a:
                net.partition(a, other)
    elif kind == "drop":
        net.link(a, b).drop_p = amount
        net.link(b, a).drop_p = amount
    elif kind == "delay":
        net.link(a, b).delay_s = amount
        net.link(a, b).jitter_s = amount / 2
    elif kind == "duplicate":
        net.link(a, b).duplicate_p = amount
    elif kind == "reorder":
        net.link(a, b).reorder_p = amount
        net.link(a, b).jitter_s = max(net.link(a, b).jitter_s, 0.002)
    elif kind == "reset":
        net.link(a, b).reset_p = amount
    elif kind == "slow":
        net.link(a, b).slice_p = amount
    elif kind == "pause":
        sim.pause(a, amount)
    elif kind == "skew":
        sim.skew(a, amount)
    elif kind == "heal":
        net.heal()
    elif kind in REPLICA_FAULTS:
        argument: Any = a
        if kind == "add-node":
            host, port = sim.config.shard_map.node(a).address
            argument = {"name": a, "host": host, "port": port}
        await _authority(sim, "coord." + kind.replace("-", "_"), argument)


async def _authority(sim: Simulation, method: str, argument: Any) -> None:
    """An operator's `txrpc ring mark-down|rejoin|remove-node|add-node NODE` (refusals
    and failures are part of the run: e.g. rejoining a node that is down)."""
    async with sim.client("operator") as cluster:
        try:
            with trio.move_on_after(60):
                await cluster.coordinator.options(retries_max=0).call(method, argument)
        except txrpc.RpcError as exc:
            log.info("%s %s refused: %s", method, argument, exc)


async def _nemesis(sim: Simulation, faults: Sequence[Fault], start: float) -> None:
    for fault in sorted(faults, key=lambda f: f.at_s):
        await trio.sleep_until(start + fault.at_s)
        await apply_fault(sim, fault)


@dataclass
class SimResult:
    seed: int
    workload: str
    faults: tuple[Fault, ...]
    history: History
    checks: list[CheckResult]
    in_doubt: dict[int, str]
    crashes: list[tuple[float, str, str]]
    network: dict[str, Any]
    simulated_s: float
    broken: frozenset[str] = field(default_factory=frozenset)
    duration_s: float = 0.0
    clients: int = 0
    replication_factor: int = 1
    #: How many times each ``buggify`` point fired.
    buggified: dict[str, int] = field(default_factory=dict)
    shards: int = 3
    buggify_p: float = 0.0
    crash_points: dict[str, float] = field(default_factory=dict)

    @property
    def committed(self) -> int:
        """Operations that completed ok."""
        return self.counts()["ok"]

    @property
    def valid(self) -> bool:
        return all(check.valid for check in self.checks)

    def counts(self) -> dict[str, int]:
        counts = {"ok": 0, "fail": 0, "info": 0}
        for op in self.history:
            if op.type in counts:
                counts[op.type] += 1
        return counts

    def replay_command(self) -> str:
        """The ``txrpc sim run`` command line that replays this run."""
        hash_seed = os.environ.get("PYTHONHASHSEED")
        steps = " ".join(f"--fault {f.cli()}" for f in sorted(self.faults, key=lambda f: f.at_s))
        broken = " ".join(f"--broken {b}" for b in sorted(self.broken))
        points = " ".join(f"--crash-point {name}={p:g}" for name, p in sorted(self.crash_points.items()))
        prefix = f"PYTHONHASHSEED={hash_seed} " if hash_seed else ""
        return " ".join(
            x
            for x in (
                f"{prefix}txrpc sim run --workload {self.workload} --seed {self.seed}",
                f"--duration {self.duration_s:g} --clients {self.clients}",
                f"--shards {self.shards}" if self.shards != 3 else "",
                f"--replication {self.replication_factor}" if self.replication_factor > 1 else "",
                f"--buggify {self.buggify_p:g}" if self.buggify_p else "",
                points,
                steps,
                broken,
            )
            if x
        )

    def report(self) -> str:
        lines = [
            f"simulation {self.workload}: {'VALID' if self.valid else 'INVALID'} — {replay_hint(self.seed)}",
            f"  operations: {self.counts()}  simulated {self.simulated_s:.1f}s  crashes {len(self.crashes)}",
            f"  network: {self.network}",
        ]
        if self.buggified:
            lines.append(f"  buggify fired: {dict(sorted(self.buggified.items()))}")
        if self.broken:
            lines.append(f"  broken on purpose: {', '.join(sorted(self.broken))}")
        ordered = sorted(self.faults, key=lambda f: f.at_s)
        lines.append("  schedule: " + ("; ".join(str(f) for f in ordered) or "(no faults)"))
        lines.append("  replay: " + self.replay_command())
        for check in self.checks:
            lines.append(f"  {check}")
        return "\n".join(lines)


def run_simulation(
    seed: int,
    *,
    workload: str = "bank",
    faults: Sequence[Fault] = (),
    options: SimOptions | None = None,
    workload_options: WorkloadOptions | None = None,
    settle_s: float = 30.0,
) -> SimResult:
    """One seeded run of ``workload`` under ``faults``; see the module docstring."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    wopts = workload_options or WorkloadOptions()
    sopts = options or SimOptions()
    service = list_append_service() if workload == "list-append" else bank_service()
    history = History()
    rng = random.Random(seed ^ 0x5EED)

    async def main(sim: Simulation) -> SimResult:
        sim.client_names = [f"c{i}" for i in range(wopts.clients)]
        total = 0
        if workload == "bank":
            async with sim.client("setup") as cluster:
                total = await bank_setup(cluster, wopts)
        elif workload == "idempotency":
            name, host, port = KEYED_SERVER
            await sim.add_server(name, [counter_service()], host, port)
        start = trio.current_time()
        until = start + wopts.duration_s
        counter = [0]

        async def client(index: int) -> None:
            if workload == "idempotency":
                sim.become(f"c{index}")
                await keyed_client(history, index, random.Random(rng.random()), wopts, until)
                return
            async with sim.client(f"c{index}") as cluster:
                if workload == "bank":
                    await bank_client(cluster, history, index, random.Random(rng.random()), wopts, until)
                else:
                    await list_append_client(
                        cluster, history, index, random.Random(rng.random()), wopts, until, counter
                    )

        async with trio.open_nursery() as nursery:
            for index in range(wopts.clients):
                nursery.start_soon(client, index)
            with trio.move_on_at(until):
                await _nemesis(sim, faults, start)
                await trio.sleep_forever()
        # Faults stop: heal the network, restart what is down, let the protocol finish.
        sim.heal()
        await sim.restart_all()
        faults_stopped_at = trio.current_time()
        left = await sim.wait_settled(settle_s)
        now = trio.current_time()
        checks = [check_termination(left, faults_stopped_at=faults_stopped_at, deadline_s=settle_s, now=now)]
        if workload == "idempotency":
            record_executions(history, sim.storage_path(KEYED_SERVER[0]))
            checks.insert(0, check_idempotency(history))
        else:
            await _final_checks(sim, workload, history, wopts, total, checks)
            if sopts.replication_factor > 1:
                checks.append(await _replica_check(sim))
        return SimResult(
            seed=seed,
            workload=workload,
            faults=tuple(faults),
            history=history,
            checks=checks,
            in_doubt=left,
            crashes=list(sim.crashes),
            network=sim.network.describe(),
            simulated_s=trio.current_time(),
            broken=sim.broken,
            duration_s=wopts.duration_s,
            clients=wopts.clients,
            replication_factor=sopts.replication_factor,
            buggified=dict(sim.buggified),
            shards=sopts.shards,
            buggify_p=sopts.buggify_p,
            crash_points=dict(sopts.crash_points),
        )

    return simulate(main, seed=seed, services=[service], options=sopts)


async def _final_checks(
    sim: Simulation, workload: str, history: History, wopts: WorkloadOptions, total: int, checks: list[CheckResult]
) -> None:
    async with sim.client("final") as cluster:
        if workload == "bank":
            await bank_final_read(cluster, history, wopts)
            checks.insert(0, check_bank(history, accounts=[f"acct{i}" for i in range(wopts.accounts)], total=total))
        else:
            await list_append_final_read(cluster, history, wopts)
            checks.insert(0, check_list_append(history))


async def _replica_check(sim: Simulation) -> CheckResult:
    """Replica consistency at the end: within the authority's final epoch, every live
    replica of every partition holds the same committed state (per-partition digests,
    `txrpc ring verify`'s comparison). Phase 2 reaches followers after the clients hear
    "committed", so the digests are read once nothing is in doubt (bounded)."""
    groups: dict[Any, dict[str, Any]] = {}
    async with sim.client("verifier") as cluster:
        with trio.move_on_after(30):
            while True:
                shard_map, replies = await cluster.replica_digests(skip=sim.down)
                table = digest_table(shard_map, replies)
                groups = {(shard_map.epoch, partition): values for partition, values in table.items()}
                if check_replica_consistency(groups).valid and not replicas_in_doubt(replies):
                    break
                await trio.sleep(0.5)
    return check_replica_consistency(groups)


def fault_schedules(
    nodes: Sequence[str] = (COORDINATOR, "s0", "s1", "s2"),
    clients: Sequence[str] = ("c0", "c1"),
    duration_s: float = 5.0,
    max_faults: int = 6,
    replicated: bool = False,
) -> Any:
    """A Hypothesis strategy of fault schedules over ``nodes`` (needs ``hypothesis``);
    ``replicated`` adds the authority's faults (mark-down, rejoin of a shard node)."""
    from hypothesis import strategies as st

    everyone = [*nodes, *clients]
    times = st.floats(0.0, duration_s, allow_nan=False).map(lambda t: round(t, 2))
    node = st.sampled_from(list(nodes))
    anyone = st.sampled_from(everyone)
    probability = st.sampled_from([0.01, 0.05, 0.2])
    fault = st.one_of(
        st.builds(Fault, times, st.just("crash"), node),
        st.builds(Fault, times, st.just("restart"), node),
        st.builds(Fault, times, st.just("partition"), anyone, anyone),
        st.builds(Fault, times, st.just("partition-one-way"), anyone, anyone),
        st.builds(Fault, times, st.just("isolate"), node),
        st.builds(Fault, times, st.sampled_from(LINK_FAULTS), anyone, anyone, probability),
        st.builds(Fault, times, st.just("delay"), anyone, anyone, st.sampled_from([0.005, 0.05, 0.3])),
        st.builds(Fault, times, st.just("pause"), node, st.just(""), st.sampled_from([0.1, 0.5, 2.0])),
        st.builds(Fault, times, st.just("skew"), node, st.just(""), st.sampled_from([-30.0, 5.0, 3600.0])),
        st.builds(Fault, times, st.just("heal")),
    )
    if replicated:
        shard = st.sampled_from([n for n in nodes if n != COORDINATOR])
        fault = st.one_of(fault, st.builds(Fault, times, st.sampled_from(REPLICA_FAULTS), shard))
    return st.lists(fault, max_size=max_faults).map(tuple)


def random_schedule(
    rng: random.Random,
    nodes: Sequence[str] = (COORDINATOR, "s0", "s1", "s2"),
    clients: Sequence[str] = ("c0", "c1"),
    duration_s: float = 5.0,
    max_faults: int = 6,
    replicated: bool = False,
) -> tuple[Fault, ...]:
    """A random schedule drawn from ``rng`` (the same space as :func:`fault_schedules`,
    without Hypothesis): what ``txrpc sim explore`` runs."""
    everyone = [*nodes, *clients]
    faults = []
    for _ in range(rng.randint(0, max_faults)):
        at = round(rng.uniform(0.0, duration_s), 2)
        kind = rng.choice([k for k in FAULT_KINDS if replicated or k not in REPLICA_FAULTS])
        if kind in REPLICA_FAULTS:
            faults.append(Fault(at, kind, rng.choice([n for n in nodes if n != COORDINATOR])))
        elif kind in ("crash", "restart", "isolate"):
            faults.append(Fault(at, kind, rng.choice(list(nodes))))
        elif kind in ("partition", "partition-one-way"):
            faults.append(Fault(at, kind, rng.choice(everyone), rng.choice(everyone)))
        elif kind in LINK_FAULTS:
            faults.append(Fault(at, kind, rng.choice(everyone), rng.choice(everyone), rng.choice([0.01, 0.05, 0.2])))
        elif kind == "delay":
            faults.append(Fault(at, kind, rng.choice(everyone), rng.choice(everyone), rng.choice([0.005, 0.05, 0.3])))
        elif kind == "pause":
            faults.append(Fault(at, kind, rng.choice(list(nodes)), "", rng.choice([0.1, 0.5, 2.0])))
        elif kind == "skew":
            faults.append(Fault(at, kind, rng.choice(list(nodes)), "", rng.choice([-30.0, 5.0, 3600.0])))
        else:
            faults.append(Fault(at, "heal"))
    return tuple(sorted(faults, key=lambda f: f.at_s))
