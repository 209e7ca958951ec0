"""``txrpc ring show`` and ``txrpc ring plan``: placement, load per node, what moves on a change.

Mounted into the main CLI with ``cli.add_command(ring)``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import click
import trio
from rich import box
from rich.bar import Bar
from rich.console import Console
from rich.table import Table

from ._client import connect
from ._cluster import digest_table
from ._cluster_cli import admin_credentials, call_coordinator
from ._errors import RpcError
from ._ring import HashRing, RebalancePlan, RingNode, load_bound
from ._shardmap import NODE_NAME_PATTERN, ClusterConfig, ConfigError, NodeSpec, ShardMap, load_cluster_config

BAR_WIDTH = 24


def _load(config_path: Path) -> tuple[ShardMap, str]:
    try:
        config = load_cluster_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    return config.shard_map, config.source


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


@click.group(name="ring")
def ring() -> None:
    """Inspect placement: the shard map, load per node, what moves when nodes change."""


@ring.command(name="show")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="cluster.toml",
    show_default=True,
    help="The cluster file.",
)
def show(config_path: Path) -> None:
    """Nodes, their partitions, their share of the key space and a bar per node."""
    shard_map, source = _load(config_path)
    console = Console()
    primaries = shard_map.partition_counts()
    copies = shard_map.replica_counts()
    total_weight = math.fsum(node.weight for node in shard_map.nodes)
    largest = max(primaries.values()) / shard_map.partitions
    table = Table(
        title=(
            f"{source}: epoch {shard_map.epoch}, {len(shard_map.nodes)} nodes, "
            f"{shard_map.partitions} partitions, replication factor {shard_map.replication_factor}"
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("node", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("zone", no_wrap=True)
    table.add_column("weight", justify="right", no_wrap=True, min_width=6)
    table.add_column("primary", justify="right", no_wrap=True, min_width=7)
    table.add_column("copies", justify="right", no_wrap=True, min_width=6)
    table.add_column("key space", justify="right", no_wrap=True, min_width=9)
    table.add_column("load", justify="right", no_wrap=True, min_width=5)
    table.add_column("share", ratio=1, min_width=6)
    worst = 0.0
    for node in shard_map.nodes:
        share = primaries[node.name] / shard_map.partitions
        target = node.weight / total_weight
        load = share / target
        worst = max(worst, load)
        table.add_row(
            node.name,
            f"{node.host}:{node.port}",
            node.zone or "-",
            f"{node.weight:g}",
            str(primaries[node.name]),
            str(copies[node.name]),
            _percent(share),
            f"{load:.3f}",
            Bar(size=largest, begin=0, end=share, width=BAR_WIDTH),
        )
    console.print(table)
    bound = max(load_bound(node.weight / total_weight, shard_map.partitions) for node in shard_map.nodes)
    console.print(
        f"primary/copies: partitions the node is primary of / holds a copy of. "
        f"load: key space / (weight / total weight); max {worst:.3f}, documented bound {bound:.3f}."
    )


def _parse_node(spec: str, weight: float | None, zone: str | None) -> RingNode:
    name = spec.split("@", 1)[0]
    if not NODE_NAME_PATTERN.fullmatch(name):
        raise click.BadParameter(f"{name!r} is not a node name", param_hint="--add")
    try:
        return RingNode(name, 1.0 if weight is None else weight, zone)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--add") from None


@ring.command(name="plan")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="cluster.toml",
    show_default=True,
    help="The cluster file.",
)
@click.option("--add", "added", multiple=True, metavar="NODE", help="A node that joins (repeatable).")
@click.option("--remove", "removed", multiple=True, metavar="NODE", help="A node that leaves (repeatable).")
@click.option("--weight", type=float, default=None, help="Weight of the added nodes (default 1).")
@click.option("--zone", default=None, help="Zone of the added nodes.")
@click.option(
    "--ranges",
    "ranges_shown",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many moved key ranges to list.",
)
def plan(
    config_path: Path,
    added: tuple[str, ...],
    removed: tuple[str, ...],
    weight: float | None,
    zone: str | None,
    ranges_shown: int,
) -> None:
    """What moves when nodes join (--add) or leave (--remove), beside the optimum."""
    if not added and not removed:
        raise click.UsageError("give at least one --add NODE or --remove NODE")
    shard_map, source = _load(config_path)
    old = shard_map.ring()
    new = old
    try:
        for name in removed:
            new = new.without_node(name)
        for spec in added:
            new = new.with_node(_parse_node(spec, weight, zone))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    replicas = shard_map.replication_factor
    if replicas > len(new):
        raise click.ClickException(
            f"replication factor {replicas} needs {replicas} nodes; the new ring has {len(new)}"
        )
    result = RebalancePlan.between(old, new, replicas)
    _print_plan(Console(), source, old, new, result, ranges_shown)


def _table(title: str) -> Table:
    return Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False
    )


def _print_plan(
    console: Console, source: str, old: HashRing, new: HashRing, result: RebalancePlan, ranges_shown: int
) -> None:
    change = ", ".join(
        [*(f"+{name}" for name in result.nodes_added), *(f"-{name}" for name in result.nodes_removed)]
    )
    summary = _table(f"{source}: {change} ({len(old)} -> {len(new)} nodes, {result.partitions} partitions)")
    summary.add_column("")
    summary.add_column("moves", justify="right", no_wrap=True)
    summary.add_column("optimum", justify="right", no_wrap=True)
    summary.add_column("moves/optimum", justify="right", no_wrap=True)
    summary.add_row(
        "keys whose primary changes",
        f"{_percent(result.fraction_moved)} ({round(result.fraction_moved * result.partitions)})",
        _percent(result.fraction_optimal),
        f"{result.ratio_to_optimal:.3f}",
    )
    # A node's fair share of copies is its share of the key space only with equal
    # weights and no zones (weights set primary shares; zones constrain replica sets).
    nodes = (*old.nodes, *new.nodes)
    plain = all(node.zone is None and node.weight == nodes[0].weight for node in nodes)
    copies_optimal = result.fraction_optimal
    summary.add_row(
        f"copies to make (of {result.partitions} x {result.replicas})",
        f"{_percent(result.copies_fraction)} ({result.copies})",
        _percent(copies_optimal) if plain else "n/a",
        f"{result.copies_fraction / copies_optimal:.3f}" if plain and copies_optimal else "-",
    )
    summary.add_row("replica sets that change", str(result.partitions_changed), "", "")
    console.print(summary)
    notes = []
    if result.nodes_added and not result.nodes_removed:
        moved_to_added = all(after in result.nodes_added for _, after in result.primary_transfers())
        notes.append(f"primaries move only to added nodes: {_yes(moved_to_added)}")
    elif result.nodes_removed and not result.nodes_added:
        moved_off_removed = all(before in result.nodes_removed for before, _ in result.primary_transfers())
        notes.append(f"primaries move only off removed nodes: {_yes(moved_off_removed)}")
    if plain and not result.nodes_removed:
        notes.append(f"optimum = {len(result.nodes_added)}/{len(new)} of the key space")
    elif not plain:
        notes.append("optimum = the change in target shares (weight / total weight)")
    console.print("; ".join(notes))

    transfers = _table("copies to make: source -> target")
    transfers.add_column("from")
    transfers.add_column("to")
    transfers.add_column("partitions", justify="right", no_wrap=True)
    transfers.add_column("of the key space", justify="right", no_wrap=True)
    for (source_node, target_node), count in result.transfers().items():
        transfers.add_row(source_node, target_node, str(count), _percent(count / result.partitions))
    console.print(transfers)

    if ranges_shown and result.moves:
        moves = _table(
            f"moved key ranges (first {min(ranges_shown, len(result.moves))} of {len(result.moves)})"
        )
        moves.add_column("partitions", no_wrap=True)
        moves.add_column("key hash range", no_wrap=True)
        moves.add_column("before")
        moves.add_column("after")
        for move in result.moves[:ranges_shown]:
            partitions = (
                str(move.first_partition)
                if move.partition_count == 1
                else f"{move.first_partition}..{move.last_partition}"
            )
            end = f"{move.hash_end:016x}" if move.hash_end < 2**64 else "2^64"
            moves.add_row(
                partitions, f"[{move.hash_start:016x}, {end})", " ".join(move.before), " ".join(move.after)
            )
        console.print(moves)


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


# --- the live cluster: failover by hand, and replica verification ---------------------------


def _load_config(config_path: Path) -> ClusterConfig:
    try:
        return load_cluster_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _authority_call(config: ClusterConfig, method: str, argument: Any, *, timeout_s: float, status: str) -> Any:
    """Ask the shard-map authority (the coordinator) for a change, with a spinner."""
    try:
        with Console().status(status):
            return call_coordinator(config, method, argument, timeout_s=timeout_s)
    except RpcError as exc:
        raise click.ClickException(f"{exc.code.name}: {exc.message}") from None


def _change_map(config_path: Path, method: str, node: str) -> None:
    config = _load_config(config_path)
    result = _authority_call(config, method, node, timeout_s=30, status=f"{method} {node}")
    console = Console()
    console.print(
        f"shard map epoch [bold]{result['epoch']}[/]; published to {', '.join(result['published']) or 'no node'}"
    )
    if result["unreachable"]:
        console.print(
            f"[yellow]not reachable now:[/] {', '.join(result['unreachable'])} "
            "(they learn the new epoch from the first message that carries it)"
        )


@ring.command(name="promote")
@click.argument("node")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="cluster.toml",
              show_default=True, help="The cluster file.")  # fmt: skip
def promote(node: str, config_path: Path) -> None:
    """Make NODE the primary of every partition it replicates, at a new epoch.

    The old primaries are deposed: their followers refuse the old epoch, so they can
    no longer commit; NODE resolves the transactions it inherits in doubt."""
    _change_map(config_path, "coord.promote", node)


@ring.command(name="mark-down")
@click.argument("node")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="cluster.toml",
              show_default=True, help="The cluster file.")  # fmt: skip
def mark_down(node: str, config_path: Path) -> None:
    """Drop NODE from every replica set at a new epoch (a failed node): where it was the
    primary, the next replica takes over. Refused if NODE is some partition's last replica."""
    _change_map(config_path, "coord.mark_down", node)


def _move_command(config: ClusterConfig, method: str, argument: Any, status: str) -> dict[str, Any]:
    result: dict[str, Any] = _authority_call(config, method, argument, timeout_s=1300, status=status)
    return result


def _print_move(result: dict[str, Any], what: str) -> None:
    added, final = result["epochs"]
    Console().print(
        f"{what}: {result['partitions']} partition copies joined at epoch {added} ({result['rows']} rows copied, "
        f"{result['deleted']} stale deleted); new replica sets at epoch [bold]{final}[/]; "
        f"{result['dropped']} rows dropped by the nodes that left"
    )


@ring.command(name="add-node")
@click.argument("node")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="cluster.toml",
              show_default=True, help="The cluster file (it lists NODE, already running).")  # fmt: skip
def add_node(node: str, config_path: Path) -> None:
    """Add NODE (listed in the cluster file and already running) and move to it the
    partitions the ring now places on it — about 1/N of the data — while transactions
    continue: it joins them as a follower, catches up, then the new replica sets take
    over at a new epoch."""
    config = _load_config(config_path)
    try:
        spec = config.shard_map.node(node)
    except KeyError:
        raise click.ClickException(f"{config.source} lists no node {node!r}: add its [[nodes]] entry first") from None
    wire = {"name": spec.name, "host": spec.host, "port": spec.port, "weight": spec.weight}
    if spec.zone is not None:
        wire["zone"] = spec.zone
    _print_move(_move_command(config, "coord.add_node", wire, f"adding {node}"), f"added {node}")


@ring.command(name="remove-node")
@click.argument("node")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="cluster.toml",
              show_default=True, help="The cluster file.")  # fmt: skip
def remove_node(node: str, config_path: Path) -> None:
    """Move every partition off NODE (to the nodes the ring picks instead) while
    transactions continue, then drop it from the shard map; stop it afterwards."""
    config = _load_config(config_path)
    _print_move(_move_command(config, "coord.remove_node", node, f"removing {node}"), f"removed {node}")


@ring.command(name="rejoin")
@click.argument("node")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="cluster.toml",
              show_default=True, help="The cluster file.")  # fmt: skip
def rejoin(node: str, config_path: Path) -> None:
    """Bring NODE back into the replica sets the ring gives it (after `mark-down`, once it
    runs again): it joins as a follower at a new epoch, copies those partitions from their
    primaries while transactions continue, then the ring's order is restored."""
    config = _load_config(config_path)
    _print_move(_move_command(config, "coord.rejoin", node, f"{node}: joining and catching up"), f"{node} rejoined")


@ring.command(name="verify")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default="cluster.toml",
              show_default=True, help="The cluster file.")  # fmt: skip
def verify(config_path: Path) -> None:
    """Ask every replica for the digests of its partitions and compare them per replica
    set. Exit status 1 if two replicas of one partition differ in one epoch."""
    config = _load_config(config_path)
    credentials = admin_credentials(config)

    async def ask(node: NodeSpec) -> dict[str, Any] | str:
        try:
            async with connect(node.host, node.port, credentials=credentials, connect_now=False) as client:
                reply: dict[str, Any] = await client.options(timeout=60, retries_max=0).call("repl.digests")
                return reply
        except (RpcError, OSError) as exc:
            return str(exc)

    async def main() -> dict[str, dict[str, Any] | str]:
        replies: dict[str, dict[str, Any] | str] = {}

        async def one(node: NodeSpec) -> None:
            replies[node.name] = await ask(node)

        async with trio.open_nursery() as nursery:
            for node in config.shard_map.nodes:
                nursery.start_soon(one, node)
        return replies

    replies = trio.run(main)
    shard_map = _current_map(config)
    report = compare_digests(shard_map, replies)
    console = Console()
    table = Table(title=f"{config.source}: replica digests", box=box.SIMPLE_HEAVY)
    for column in ("node", "epoch", "partitions held", "rows", "in doubt", "state"):
        table.add_column(column, justify="right" if column not in ("node", "state") else "left")
    for name in sorted(replies):
        reply = replies[name]
        if isinstance(reply, str):
            table.add_row(name, "-", "-", "-", "-", f"[red]unreachable[/] ({reply[:60]})")
            continue
        rows = sum(int(entry[1]) for entry in reply["partitions"])
        state = "[red]differs[/]" if name in report.nodes_differing else "[green]ok[/]"
        held = str(len(reply["partitions"]))
        table.add_row(name, str(reply["epoch"]), held, str(rows), str(reply["in_doubt"]), state)
    console.print(table)
    for line in report.differences[:20]:
        console.print(f"[red]{line}[/]")
    if report.differences:
        console.print(f"[red bold]{len(report.differences)} partition(s) differ between replicas[/]")
        sys.exit(1)
    if report.stale:
        console.print(f"[yellow]not at epoch {shard_map.epoch} (not compared): {', '.join(report.stale)}[/]")
    console.print(
        f"[green]epoch {shard_map.epoch}: {report.partitions_compared} partitions with data compared; "
        "every replica set agrees[/]"
    )


def _current_map(config: ClusterConfig) -> ShardMap:
    """The authority's map (the coordinator's), or the file's when there is none."""
    if config.coordinator is None:
        return config.shard_map
    try:
        return ShardMap.from_wire(call_coordinator(config, "coord.shard_map"))
    except (RpcError, OSError):
        return config.shard_map


class DigestReport:
    def __init__(self) -> None:
        self.differences: list[str] = []
        self.nodes_differing: set[str] = set()
        self.partitions_compared = 0
        self.stale: list[str] = []


def compare_digests(shard_map: ShardMap, replies: dict[str, dict[str, Any] | str]) -> DigestReport:
    """Compare ``repl.digests`` replies against ``shard_map``: the replicas of each
    partition that answered at the map's epoch must report the same (rows, digest); a
    replica with no rows of a partition counts as empty. Replies at another epoch are
    listed in ``stale`` and not compared."""
    report = DigestReport()
    report.stale = sorted(
        name for name, reply in replies.items() if isinstance(reply, dict) and int(reply["epoch"]) != shard_map.epoch
    )
    for partition, values in digest_table(shard_map, replies).items():
        report.partitions_compared += 1
        if len(set(values.values())) > 1:
            report.differences.append(
                f"partition {partition}: "
                + ", ".join(f"{n}={v[0]} rows/{v[1][:12] or '-'}" for n, v in values.items())
            )
            report.nodes_differing.update(values)
    return report
