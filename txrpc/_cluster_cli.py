"""`txrpc coordinator`, `txrpc shard` and `txrpc tx …`: running and inspecting a cluster.

The CLI is the composition root: the only place in the ``txrpc`` package that imports
``coordinator`` (lazily, inside the commands that run cluster processes).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import click
import trio
from rich.console import Console
from rich.table import Table

from ._client import connect
from ._errors import RpcError
from ._security import Credentials
from ._serve import freeze_startup_heap
from ._shardmap import ClusterConfig, ConfigError, load_cluster_config

console = Console()


def _load(config: str) -> ClusterConfig:
    try:
        return load_cluster_config(config)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None


def _run_until_signal(main: Any) -> None:
    """Run ``main()`` under trio until it returns or SIGINT/SIGTERM arrives."""

    async def runner() -> None:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signals)
            await main()
            nursery.cancel_scope.cancel()

    trio.run(runner)


@click.command("coordinator")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="cluster.toml")
@click.option(
    "--db",
    default=None,
    help="Database URL for the decision log (default: SQLite in the coordinator's data_dir).",
)
@click.option("--tx-timeout", default=30.0, show_default=True, help="Transaction deadline in seconds.")
def coordinator_command(config_path: str, db: str | None, tx_timeout: float) -> None:
    """Run the coordinator service of a cluster (two-phase commit, presumed abort)."""
    from coordinator import run_coordinator

    config = _load(config_path)
    if config.coordinator is None:
        raise click.BadParameter(f"{config_path} has no [coordinator] table", param_hint="--config")
    spec = config.coordinator

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_coordinator(
                    config, db_url=db, tx_timeout_s=tx_timeout, task_status=task_status
                )
            )
            click.echo(f"coordinator ready on {spec.host}:{spec.port}", err=False)
            sys.stdout.flush()
            freeze_startup_heap()

    _run_until_signal(main)


@click.command("shard")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="cluster.toml")
@click.option("--node", required=True, help="This node's name in the cluster file.")
@click.option(
    "--service",
    "service_specs",
    multiple=True,
    metavar="MODULE:SERVICE",
    help="Services to host (default: cluster.services).",
)
@click.option("--db", default=None, help="Database URL (default: SQLite in the node's data_dir).")
@click.option(
    "--idle-timeout",
    default=10.0,
    show_default=True,
    help="Abort unprepared transactions idle this long (s).",
)
def shard_command(
    config_path: str, node: str, service_specs: tuple[str, ...], db: str | None, idle_timeout: float
) -> None:
    """Run one shard node: hosts the cluster's transactional services."""
    from coordinator import run_shard

    from .cli import load_services

    config = _load(config_path)
    if node not in config.shard_map:
        names = ", ".join(n.name for n in config.shard_map.nodes)
        raise click.BadParameter(f"no node {node!r} in {config_path} (nodes: {names})", param_hint="--node")
    specs = service_specs or config.services
    if not specs:
        raise click.UsageError("no services: pass --service MODULE:SERVICE or set cluster.services")
    services = load_services(specs)
    address = config.shard_map.node(node).address

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_shard(
                    config, node, services, db_url=db, tx_idle_timeout_s=idle_timeout, task_status=task_status
                )
            )
            click.echo(f"shard {node} ready on {address[0]}:{address[1]}")
            sys.stdout.flush()
            freeze_startup_heap()

    _run_until_signal(main)


@click.group("tx")
def tx_group() -> None:
    """Inspect and resolve transactions at the coordinator."""


def admin_credentials(config: ClusterConfig) -> Credentials | None:
    """With ``[security]``, admin commands present the first admin's certificate (or token)."""
    security = config.security
    if security is None:
        return None
    return security.credentials_for(security.admins[0] if security.admins else None)


def call_coordinator(config: ClusterConfig, method: str, *args: Any, timeout_s: float = 10.0) -> Any:
    """One admin call to ``config``'s coordinator (raises ``RpcError``); run from sync code."""
    if config.coordinator is None:
        raise click.ClickException(f"{config.source} has no [coordinator] table")
    host, port = config.coordinator.host, config.coordinator.port

    async def main() -> Any:
        async with connect(host, port, credentials=admin_credentials(config)) as client:
            return await client.options(timeout=timeout_s).call(method, *args)

    return trio.run(main)


def _coordinator_call(config_path: str, method: str, *args: Any) -> Any:
    config = _load(config_path)
    if config.coordinator is None:
        raise click.BadParameter(f"{config_path} has no [coordinator] table", param_hint="--config")
    try:
        return call_coordinator(config, method, *args)
    except RpcError as exc:
        click.echo(f"error: {exc.code.name}: {exc.message}", err=True)
        sys.exit(1)


@tx_group.command("ls")
@click.option("--config", "config_path", required=True)
@click.option("--in-doubt", is_flag=True, help="Only transactions being prepared or in phase 2.")
@click.option("--limit", default=50, show_default=True)
def tx_ls(config_path: str, in_doubt: bool, limit: int) -> None:
    """List live transactions and recorded decisions."""
    rows = _coordinator_call(config_path, "coord.transactions", in_doubt, limit)
    table = Table(title="transactions" + (" in doubt" if in_doubt else ""))
    for column in ("txid", "phase", "participants", "votes", "acked", "reason"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["txid"]),
            str(row.get("phase") or row.get("outcome")),
            ",".join(row.get("participants", [])),
            json.dumps(row.get("votes", {})) if row.get("votes") else "",
            ",".join(row.get("acked", [])),
            row.get("reason", ""),
        )
    console.print(table)
    if not rows:
        console.print("none")


@tx_group.command("show")
@click.option("--config", "config_path", required=True)
@click.argument("txid", type=int)
def tx_show(config_path: str, txid: int) -> None:
    """Everything the coordinator knows about TXID."""
    info = _coordinator_call(config_path, "coord.show", txid)
    console.print_json(json.dumps(info, default=repr))


@tx_group.command("resolve")
@click.option("--config", "config_path", required=True)
@click.argument("txid", type=int)
@click.option("--commit", "outcome", flag_value="commit", help="Heuristic commit.")
@click.option("--abort", "outcome", flag_value="abort", help="Heuristic abort.")
def tx_resolve(config_path: str, txid: int, outcome: str | None) -> None:
    """Record a heuristic decision for TXID (refused if a decision exists).

    Use only when the coordinator's log is lost and participants are stuck in doubt;
    the decision is recorded as heuristic and in-doubt participants adopt it.
    """
    if outcome is None:
        raise click.UsageError("say --commit or --abort")
    result = _coordinator_call(config_path, "coord.resolve", txid, outcome)
    console.print(f"transaction {txid}: heuristic [bold]{result}[/] recorded")


def register(cli: click.Group) -> None:
    cli.add_command(coordinator_command)
    cli.add_command(shard_command)
    cli.add_command(tx_group)
