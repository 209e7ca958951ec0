"""``txrpc chaos``: fault injection against a local real-process cluster, with a verdict.

Exit status: 0 the checkers found nothing; 1 a violation (an anomaly in the history,
a transaction still in doubt after settling, no final read, a node that did not
restart); 2 bad usage; 3 the run could not be carried out (the cluster did not start);
130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

EXIT_VALID = 0
EXIT_VIOLATION = 1
EXIT_NOT_RUN = 3
EXIT_INTERRUPTED = 130


def _parse_faults(text: str) -> tuple[str, ...]:
    from .testing._chaos import FAULT_KINDS

    if text.strip().lower() == "none":
        return ()
    kinds = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise click.BadParameter(
            f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)} (or 'none')",
            param_hint="--faults",
        )
    if len(set(kinds)) != len(kinds):
        raise click.BadParameter(f"a fault kind is listed twice in {text!r}", param_hint="--faults")
    if not kinds:
        raise click.BadParameter("list at least one fault kind, or 'none'", param_hint="--faults")
    return kinds


def _faults_help() -> str:
    from .testing._chaos import DEFAULT_FAULTS, FAULT_HELP

    kinds = "; ".join(f"{kind}: {what}" for kind, what in FAULT_HELP.items())
    return f"Comma-separated fault kinds, or 'none' [default: {','.join(DEFAULT_FAULTS)}]. {kinds}."


@click.command("chaos")
@click.option(
    "--workload",
    type=click.Choice(["bank", "list-append"]),
    default="bank",
    show_default=True,
    help="bank: transfers and reads, checked for conservation; list-append: Elle-style anomaly check.",
)
@click.option("--faults", "faults_text", default=None, metavar="KIND,…", help=_faults_help())
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(1.0, 3600.0),
    default=60.0,
    show_default=True,
    help="Seconds of workload under faults (then heal, settle, final read, check).",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=None,
    help="Seed of the fault schedule and the clients' choices [default: a fresh one, printed].",
)
@click.option(
    "--history",
    "history_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Save the operation history here as JSON lines.",
)
@click.option("--clients", type=click.IntRange(1, 64), default=4, show_default=True, help="Concurrent clients.")
@click.option(
    "--settle",
    "settle_s",
    type=click.FloatRange(1.0, 600.0),
    default=30.0,
    show_default=True,
    help="After healing, seconds allowed for in-doubt transactions to be decided.",
)
@click.option(
    "--tls",
    is_flag=True,
    help="Mutual TLS on every connection: a fresh dev CA, certificates for the coordinator, each shard, "
    "the clients and an admin, and a [security] table in every cluster file.",
)
@click.option("--keep", "keep_dir", is_flag=True, help="Keep the temporary directory (cluster files, data, logs).")
@click.option("--split-transfers", is_flag=True, hidden=True, help="Test only: non-atomic transfers (must be caught).")
def chaos(
    workload: str,
    faults_text: str | None,
    duration_s: float,
    seed: int | None,
    history_path: Path | None,
    clients: int,
    settle_s: float,
    keep_dir: bool,
    tls: bool,
    split_transfers: bool,
) -> None:
    """Run a workload against a local cluster (coordinator + 3 shard processes on
    loopback) through fault-injecting proxies, with SIGKILL/restart of processes; then
    heal, settle, check the history and print a verdict. Exit 1 on a violation.

    Example: txrpc chaos --workload bank --faults kill,partition,delay --duration 60 --seed 7 [--tls]
    """
    from .testing._chaos import DEFAULT_FAULTS, ChaosError, ChaosOptions, default_seed, render_verdict, run_chaos

    console = Console()
    faults = DEFAULT_FAULTS if faults_text is None else _parse_faults(faults_text)
    if split_transfers and workload != "bank":
        raise click.UsageError("--split-transfers applies to --workload bank only")
    if history_path is not None and not history_path.resolve().parent.is_dir():
        raise click.BadParameter(f"no directory {history_path.resolve().parent}", param_hint="--history")
    chosen_seed = default_seed() if seed is None else seed
    options = ChaosOptions(
        workload=workload,
        faults=faults,
        duration_s=duration_s,
        seed=chosen_seed,
        clients=clients,
        settle_s=settle_s,
        history_path=history_path,
        keep_dir=keep_dir,
        split_transfers=split_transfers,
        tls=tls,
    )
    console.print(f"[bold]txrpc chaos[/] seed {chosen_seed} (repeat the schedule with --seed {chosen_seed})")
    try:
        result = run_chaos(options, console)
    except ChaosError as exc:
        console.print(f"[red]chaos run not carried out:[/] {exc}")
        sys.exit(EXIT_NOT_RUN)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: cluster stopped[/]")
        sys.exit(EXIT_INTERRUPTED)
    render_verdict(result, console)
    if history_path is not None:
        console.print(f"history ({len(result.history)} records) saved to {history_path}")
    sys.exit(EXIT_VALID if result.valid else EXIT_VIOLATION)


def register(cli: click.Group, bench: click.Group) -> None:
    """Mount ``txrpc chaos`` (``bench`` is unused: chaos has no benchmark)."""
    cli.add_command(chaos)
