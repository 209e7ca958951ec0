"""``txrpc bench ring``: our placement beside uhashring 2.x, in one run, on the same keys.

Both libraries get the same random keys (``str``, from a seeded ``random.Random``) and
the same loop: ``for key in keys: fn(key)``, timed with ``time.perf_counter``, best of
``rounds``, the two libraries interleaved so drift hits both. Per-key calls are the
headline; our batch API (``lookup_many``) is reported on its own row. Machines are
noisy (±40 %): read the ratios, not the absolute figures.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from ._ring import PARTITIONS_DEFAULT, HashRing

LOOKUP_SPEEDUP_TARGET = 3.0
REPLICAS_SPEEDUP_TARGET = 3.0
LOAD_RATIO_TARGET = 1.10
MOVED_OVER_OPTIMAL_TARGET = 1.05


@dataclasses.dataclass(frozen=True, slots=True)
class BenchRow:
    """One measured quantity: ours, the peer's, how they compare and the target.

    ``ratio`` is "times better than uhashring" (throughput: ours / peer; time: peer /
    ours), ``None`` when it does not apply. ``met`` is ``None`` when there is no target.
    """

    metric: str
    unit: str
    ours: float
    peer: float | None
    ratio: float | None
    target: str
    met: bool | None


def _node_names(count: int) -> list[str]:
    return [f"node-{i}" for i in range(count)]


def _random_keys(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"key:{rng.getrandbits(64):016x}" for _ in range(count)]


def _throughput(fn: Callable[[Any], object], keys: Sequence[str]) -> float:
    """Calls per second of ``fn(key)`` over ``keys``: the one loop both libraries are timed with."""
    gc.collect()
    started = time.perf_counter()
    for key in keys:
        fn(key)
    return len(keys) / (time.perf_counter() - started)


def _best_of(rounds: int, measures: Sequence[Callable[[], float]]) -> list[float]:
    """Run each measure ``rounds`` times, interleaved; keep each one's best."""
    best = [0.0] * len(measures)
    for _ in range(rounds):
        for index, measure in enumerate(measures):
            best[index] = max(best[index], measure())
    return best


def _load_ratio(owners: Sequence[str], names: Sequence[str]) -> float:
    counts = Counter(owners)
    mean = len(owners) / len(names)
    return max(counts.get(name, 0) for name in names) / mean


def _moved(before: Sequence[str], after: Sequence[str], new_node: str) -> tuple[float, bool]:
    """Fraction of keys whose node changed, and whether every one of them went to ``new_node``."""
    moved = 0
    only_to_new = True
    for old, new in zip(before, after, strict=True):
        if old != new:
            moved += 1
            if new != new_node:
                only_to_new = False
    return moved / len(before), only_to_new


def run_ring_bench(
    keys: int = 1_000_000,
    nodes: int = 10,
    *,
    replicas: int = 3,
    partitions: int = PARTITIONS_DEFAULT,
    rounds: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Measure our ring beside uhashring on ``keys`` random keys over ``nodes`` nodes.

    Rows: build time, lookups/s, batch lookups/s (ours only), replica lookups/s for
    ``replicas`` nodes, max/mean key load, fraction of keys moved on ``nodes`` →
    ``nodes + 1`` and whether they all moved to the new node. Peer columns are
    ``None`` if uhashring is not installed. Raises ``ValueError`` for ``keys < 1``,
    ``nodes < 1``, ``replicas`` outside 1..nodes or ``rounds < 1``.
    """
    if keys < 1 or nodes < 1 or rounds < 1 or not 1 <= replicas <= nodes:
        raise ValueError("need keys >= 1, nodes >= 1, rounds >= 1 and 1 <= replicas <= nodes")
    say = progress or (lambda _message: None)
    try:
        from uhashring import HashRing as PeerRing  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - uhashring is a dev dependency
        PeerRing = None
    names = _node_names(nodes)
    grown = _node_names(nodes + 1)
    new_node = grown[-1]
    say(f"generating {keys} keys")
    key_list = _random_keys(keys, seed)
    rows: list[BenchRow] = []

    say("building rings")
    started = time.perf_counter()
    ours = HashRing(names, partitions=partitions)
    ours_build_s = time.perf_counter() - started
    started = time.perf_counter()
    ours.replica_table(replicas)  # built on first use; timed apart, excluded from lookups
    ours_replicas_build_s = time.perf_counter() - started
    peer: Any = None
    peer_build_s: float | None = None
    if PeerRing is not None:
        started = time.perf_counter()
        peer = PeerRing(nodes=names)
        peer_build_s = time.perf_counter() - started
    rows.append(
        BenchRow(
            "build ring (+ replica table)",
            "s",
            ours_build_s + ours_replicas_build_s,
            peer_build_s,
            None if peer_build_s is None else peer_build_s / (ours_build_s + ours_replicas_build_s),
            "",
            None,
        )
    )

    say("timing lookup(key)")
    measures: list[Callable[[], float]] = [lambda: _throughput(ours.lookup, key_list)]
    if peer is not None:
        measures.append(lambda: _throughput(peer.get_node, key_list))
    results = _best_of(rounds, measures)
    peer_rate = results[1] if peer is not None else None
    ratio = None if peer_rate is None else results[0] / peer_rate
    rows.append(
        BenchRow(
            "lookup(key)",
            "keys/s",
            results[0],
            peer_rate,
            ratio,
            f">= {LOOKUP_SPEEDUP_TARGET:g}x",
            None if ratio is None else ratio >= LOOKUP_SPEEDUP_TARGET,
        )
    )

    say("timing lookup_many(keys)")
    best_batch_s = math.inf
    for _ in range(rounds):
        gc.collect()
        started = time.perf_counter()
        ours.lookup_many(key_list)
        best_batch_s = min(best_batch_s, time.perf_counter() - started)
    rows.append(
        BenchRow(
            "lookup_many(keys), batch",
            "keys/s",
            keys / best_batch_s,
            None,
            None,
            "",
            None,
        )
    )

    say(f"timing preference_list(key, {replicas})")
    preference_list = ours.preference_list

    def ours_replicas(key: str) -> tuple[str, ...]:
        return preference_list(key, replicas)

    measures = [lambda: _throughput(ours_replicas, key_list)]
    if peer is not None:
        peer_range = peer.range

        def peer_replicas(key: str) -> list[Any]:
            return list(peer_range(key, replicas))

        measures.append(lambda: _throughput(peer_replicas, key_list))
    results = _best_of(rounds, measures)
    peer_rate = results[1] if peer is not None else None
    ratio = None if peer_rate is None else results[0] / peer_rate
    rows.append(
        BenchRow(
            f"preference_list(key, {replicas})",
            "keys/s",
            results[0],
            peer_rate,
            ratio,
            f">= {REPLICAS_SPEEDUP_TARGET:g}x",
            None if ratio is None else ratio >= REPLICAS_SPEEDUP_TARGET,
        )
    )

    say("measuring load and movement")
    ours_before = ours.lookup_many(key_list)
    ours_load = _load_ratio(ours_before, names)
    peer_before = [peer.get_node(key) for key in key_list] if peer is not None else None
    peer_load = _load_ratio(peer_before, names) if peer_before is not None else None
    rows.append(
        BenchRow(
            "max/mean keys per node",
            "",
            ours_load,
            peer_load,
            None,
            f"<= {LOAD_RATIO_TARGET:.2f}",
            ours_load <= LOAD_RATIO_TARGET,
        )
    )
    optimal = 1 / (nodes + 1)
    ours_after = ours.with_node(new_node).lookup_many(key_list)
    ours_moved, ours_only_new = _moved(ours_before, ours_after, new_node)
    peer_moved: float | None = None
    peer_only_new: bool | None = None
    if peer is not None and peer_before is not None:
        peer.add_node(new_node)
        peer_after = [peer.get_node(key) for key in key_list]
        peer_moved, peer_only_new = _moved(peer_before, peer_after, new_node)
    rows.append(
        BenchRow(
            f"keys moved, {nodes} -> {nodes + 1} nodes",
            "of keys",
            ours_moved,
            peer_moved,
            None,
            f"<= {MOVED_OVER_OPTIMAL_TARGET * optimal:.4f}",
            ours_moved <= MOVED_OVER_OPTIMAL_TARGET * optimal,
        )
    )
    rows.append(
        BenchRow(
            "moved keys on the new node",
            "of moved",
            1.0 if ours_only_new else 0.0,
            None if peer_only_new is None else (1.0 if peer_only_new else 0.0),
            None,
            "all",
            ours_only_new,
        )
    )
    return rows


def _format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "keys/s":
        return f"{value / 1e6:.2f} M/s" if value >= 1e6 else f"{value / 1e3:.0f} k/s"
    if unit == "s":
        return f"{value * 1e3:.1f} ms"
    if unit == "of moved":
        return f"{100 * value:.0f}%"
    return f"{value:.4f}"


def render_rows(rows: Sequence[BenchRow], title: str) -> Table:
    """The rows as a rich table: metric, txrpc, uhashring, ratio, target, met."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    table.add_column("txrpc", justify="right", no_wrap=True)
    table.add_column("uhashring", justify="right", no_wrap=True)
    table.add_column("x uhashring", justify="right", no_wrap=True)
    table.add_column("target")
    table.add_column("met", no_wrap=True)
    for row in rows:
        table.add_row(
            row.metric,
            _format_value(row.ours, row.unit),
            _format_value(row.peer, row.unit),
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            row.target,
            "-" if row.met is None else ("[green]yes[/]" if row.met else "[red]NO[/]"),
        )
    return table


@click.command(name="ring")
@click.option("--keys", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="Random keys.")
@click.option("--nodes", type=click.IntRange(min=1), default=10, show_default=True, help="Nodes in the ring.")
@click.option(
    "--replicas", type=click.IntRange(min=1), default=3, show_default=True, help="Replica list length."
)
@click.option(
    "--partitions", type=int, default=PARTITIONS_DEFAULT, show_default=True, help="Our partition count."
)
@click.option(
    "--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Timing rounds (best kept)."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random keys.")
@click.option("--check", is_flag=True, help="Exit with status 1 if a target is not met.")
def ring(keys: int, nodes: int, replicas: int, partitions: int, rounds: int, seed: int, check: bool) -> None:
    """Consistent hashing: txrpc's ring beside uhashring 2.x on the same random keys."""
    console = Console()
    if replicas > nodes:
        raise click.BadParameter(f"--replicas {replicas} exceeds --nodes {nodes}", param_hint="--replicas")
    try:
        with console.status("benchmarking") as status:
            rows = run_ring_bench(
                keys,
                nodes,
                replicas=replicas,
                partitions=partitions,
                rounds=rounds,
                seed=seed,
                progress=lambda message: status.update(message),
            )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    console.print(
        render_rows(
            rows, f"ring: {keys:,} random keys, {nodes} nodes, best of {rounds} (ratios are what count)"
        )
    )
    console.print(
        f"uhashring: default ring (md5, 160 vnodes); get_node(key); list(range(key, {replicas})).\n"
        f"txrpc: {partitions} partitions, weighted rendezvous placement; same keys, same loop "
        "(for key in keys: fn(key)); lookup_many is the batch API, shown apart.\n"
        f"targets: lookups and replica lookups >= {LOOKUP_SPEEDUP_TARGET:g}x uhashring; max/mean <= "
        f"{LOAD_RATIO_TARGET:.2f}; keys moved <= {MOVED_OVER_OPTIMAL_TARGET:.2f} x 1/{nodes + 1}, "
        "all to the new node."
    )
    if all(row.peer is None for row in rows):
        console.print("uhashring is not installed: peer columns are empty (pip install 'uhashring>=2.3').")
    missed = [row.metric for row in rows if row.met is False]
    console.print("all targets met" if not missed else f"targets NOT met: {'; '.join(missed)}")
    if check and missed:
        raise SystemExit(1)
