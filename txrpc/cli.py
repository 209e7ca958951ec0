"""The ``txrpc`` command line."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
import trio
from rich.console import Console
from rich.table import Table

from . import __version__
from ._errors import RpcError

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="txrpc")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """txrpc — transactional RPC for trio.

    Serve a service, call it, run the demo or the benchmarks. Every command has --help.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def load_object(spec: str) -> Any:
    """Import ``MODULE:NAME`` or ``path/to/file.py:NAME`` and return the attribute."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not attribute:
        raise click.BadParameter(f"{spec!r}: expected MODULE:NAME, e.g. examples/calculator/service.py:calc")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.exists():
            raise click.BadParameter(f"{spec!r}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise click.BadParameter(f"{spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.BadParameter(f"{spec!r}: cannot import {module_name}: {exc}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise click.BadParameter(f"{spec!r}: module {module_name} has no attribute {attribute!r}") from None


def load_services(specs: Any) -> list[Any]:
    """Load ``MODULE:NAME`` specs that name a ``txrpc.Service`` (or a list of them)."""
    from ._service import Service

    services: list[Service] = []
    for spec in specs:
        obj = load_object(spec)
        if isinstance(obj, Service):
            services.append(obj)
        elif isinstance(obj, (list, tuple)) and all(isinstance(s, Service) for s in obj):
            services.extend(obj)
        else:
            raise click.BadParameter(f"{spec!r} is a {type(obj).__name__}, not a txrpc.Service")
    return services


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{address!r}: expected HOST:PORT, e.g. 127.0.0.1:12345")
    return host.strip("[]") or "127.0.0.1", int(port)


@cli.command()
@click.argument("service_spec", metavar="MODULE:SERVICE", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=12345, show_default=True, help="TCP port (0 picks a free one).")
@click.option(
    "--db",
    default=None,
    metavar="URL",
    help="Request log (SQLite file or directory, sqlite:/// or postgresql+psycopg:// URL): "
    "calls with an idempotency key run at most once per key.",
)
@click.option(
    "--retention",
    default="24h",
    show_default=True,
    metavar="DURATION",
    help="How long an idempotency key is remembered after its outcome (90s, 15m, 24h, 7d).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve TLS with this certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The certificate's private key (PEM).")
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="CA that client certificates must chain to.")
@click.option(
    "--client-cert",
    type=click.Choice(["require", "optional", "none"]),
    default=None,
    help="Client certificates: require (mutual TLS; the default with --tls-ca), optional, none.",
)
@click.option(
    "--token-secret-file",
    type=click.Path(dir_okay=False),
    help="Accept HMAC bearer tokens signed with this secret (`txrpc token mint`).",
)
@click.option("--allow-anonymous", is_flag=True, help="Serve callers with no credential as 'anonymous'.")
@click.option("--role", "roles", multiple=True, metavar="IDENTITY=ROLE", help="Grant a role (repeatable).")
def serve(
    service_spec: tuple[str, ...],
    host: str,
    port: int,
    db: str | None,
    retention: str,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    client_cert: str | None,
    token_secret_file: str | None,
    allow_anonymous: bool,
    roles: tuple[str, ...],
) -> None:
    """Serve one or more services, e.g. `txrpc serve examples/calculator/service.py:calc --db ./data`.

    With --tls-cert/--tls-key the server speaks TLS; with --tls-ca it also verifies
    client certificates (mutual TLS); with --token-secret-file it accepts bearer tokens.
    Any of these switches authentication on: a caller without a valid credential is
    refused (UNAUTHENTICATED) unless --allow-anonymous.
    """
    from ._security_cli import server_security_from_options
    from ._serve import parse_duration, run_serve

    security = server_security_from_options(
        tls_cert, tls_key, tls_ca, client_cert, token_secret_file, allow_anonymous, roles
    )
    run_serve(
        load_services(service_spec),
        host=host,
        port=port,
        db=db,
        console=console,
        retention_s=parse_duration(retention),
        security=security,
    )


@cli.command()
@click.argument("address", metavar="HOST:PORT")
@click.argument("method")
@click.argument("args", nargs=-1)
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Deadline in seconds.")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Call metadata (repeatable).")
@click.option("--idempotency-key", default=None, help="Attach an idempotency key.")
@click.option("--tls", "use_tls", is_flag=True, help="Speak TLS (server verified with --tls-ca or system CAs).")
@click.option("--tls-ca", type=click.Path(dir_okay=False), help="CA to verify the server with (implies --tls).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Client certificate for mutual TLS (implies --tls).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The client certificate's key.")
@click.option("--server-name", default=None, help="Name to verify in the server's certificate (default: HOST).")
@click.option("--token", envvar="TXRPC_TOKEN", default=None, help="Bearer token (or $TXRPC_TOKEN).")
def call(
    address: str,
    method: str,
    args: tuple[str, ...],
    timeout: float,
    metadata: tuple[str, ...],
    idempotency_key: str | None,
    use_tls: bool,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    server_name: str | None,
    token: str | None,
) -> None:
    """Call METHOD on HOST:PORT and print the result as JSON.

    Each ARG is parsed as JSON (`1`, `"text"`, `[1,2]`, `{"a":1}`); an ARG that is not
    valid JSON is passed as a string. Exit status 1 on an RPC error.
    """
    from ._client import connect
    from ._security_cli import credentials_from_options

    credentials = credentials_from_options(use_tls, tls_ca, tls_cert, tls_key, server_name, token)
    host, port = parse_address(address)
    values = [_parse_json_arg(a) for a in args]
    meta: dict[str, Any] = {}
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--metadata")
        meta[key] = value

    async def main() -> Any:
        async with connect(host, port, credentials=credentials) as client:
            options: dict[str, Any] = {"timeout": timeout, "metadata": meta}
            if idempotency_key:
                options["idempotency_key"] = idempotency_key
            return await client.options(**options).call(method, *values)

    try:
        result = trio.run(main)
    except RpcError as exc:
        click.echo(f"error: {exc.code.name} ({int(exc.code)}): {exc.message}", err=True)
        if exc.details:
            click.echo(f"details: {json.dumps(exc.details, default=repr)}", err=True)
        sys.exit(1)
    click.echo(json.dumps(result, default=_json_default, indent=None))


def _parse_json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"bytes_hex": bytes(value).hex()}
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


@cli.command()
@click.option("--transfers", default=2000, show_default=True, help="Cross-shard transfers to run.")
@click.option("--concurrency", default=32, show_default=True, help="Concurrent clients.")
@click.option("--accounts", default=300, show_default=True, help="Bank accounts, spread over the shards.")
@click.option("--seed", default=1, show_default=True, help="Seed of the workload's randomness.")
@click.option("--calculator", is_flag=True, help="The small RPC demo instead (calculator, one process).")
@click.option("--calls", default=2000, show_default=True, help="Calls in the calculator demo.")
@click.option("--tls", is_flag=True, help="Mutual TLS everywhere (a dev CA and certificates made in the temp dir).")
@click.option(
    "--replication-factor",
    type=click.IntRange(1, 3),
    default=3,
    show_default=True,
    help="Copies of every partition (3 nodes: every node holds every account).",
)
def demo(
    transfers: int,
    concurrency: int,
    accounts: int,
    seed: int,
    calculator: bool,
    calls: int,
    tls: bool,
    replication_factor: int,
) -> None:
    """Start a local cluster (coordinator + 3 shard processes on SQLite in a temp dir,
    every partition replicated on 3 nodes), run concurrent cross-shard bank transfers,
    check that money is conserved and that every replica agrees, stop."""
    from ._demo import run_bank_demo, run_calculator_demo

    if calculator:
        run_calculator_demo(console, calls)
        return
    sys.exit(
        run_bank_demo(
            console, transfers, concurrency, accounts, seed, tls=tls, replication_factor=replication_factor
        )
    )


@cli.group()
def bench() -> None:
    """Benchmarks, each beside its peer in one run, reported as medians and ratios."""


@bench.command("rpc")
@click.option("--seconds", default=3.0, show_default=True, help="Duration of each measurement.")
@click.option("--rounds", default=3, show_default=True, help="Interleaved repetitions; medians are kept.")
@click.option("--callers", default="1,16,64", show_default=True, help="Concurrent callers for `add`.")
@click.option(
    "--echo-callers", default="1,8", show_default=True, help="Concurrent callers for the 1 MiB echo."
)
@click.option("--no-grpc", is_flag=True, help="Measure txrpc only (no grpcio needed).")
def bench_rpc(seconds: float, rounds: int, callers: str, echo_callers: str, no_grpc: bool) -> None:
    """Unary `add` and a 1 MiB `echo` on one connection: txrpc vs grpcio grpc.aio."""
    from rich.progress import Progress

    from ._bench_rpc import run

    add_callers = [int(c) for c in callers.split(",") if c]
    big_callers = [int(c) for c in echo_callers.split(",") if c]
    steps = (len(add_callers) + len(big_callers)) * rounds * (1 if no_grpc else 2)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=steps)
        results = run(
            add_callers, big_callers, seconds, rounds, not no_grpc, progress=lambda: progress.advance(task)
        )
    table = Table(title=f"txrpc bench rpc — medians of {rounds} × {seconds:g} s, one connection, loopback")
    for column in ("workload", "callers", "stack", "calls/s", "p50 ms", "p99 ms", "MB/s", "ratio", "target"):
        table.add_column(column, justify="right" if column not in ("workload", "stack") else "left")
    by_key = {(m.workload, m.callers, m.stack): m for m in results}
    for m in results:
        peer = by_key.get((m.workload, m.callers, "grpc.aio"))
        ratio = target = ""
        if m.stack == "txrpc" and peer is not None:
            if m.workload == "add":
                value = m.calls_per_s / peer.calls_per_s
                goal = 8.0 if m.callers >= 64 else 2.0 if m.callers == 1 else None
            else:
                value = m.mb_per_s / peer.mb_per_s
                goal = 1.5
            ratio = f"{value:.2f}×"
            if goal is not None:
                target = f"{'[green]met' if value >= goal else '[red]missed'}[/] (≥{goal:g}×)"
        table.add_row(
            m.workload,
            str(m.callers),
            m.stack,
            f"{m.calls_per_s:,.0f}",
            f"{m.p50_ms:.2f}",
            f"{m.p99_ms:.2f}",
            f"{m.mb_per_s:,.0f}" if m.mb_per_s else "",
            ratio,
            target,
        )
    console.print(table)


def _mount_subcommands() -> None:
    from ._bench_idempotency import idempotency as bench_idempotency
    from ._bench_ring import ring as bench_ring
    from ._bench_tx import tx as bench_tx
    from ._cluster_cli import register
    from ._log_cli import log as log_group
    from ._replay_cli import replay
    from ._ring_cli import ring as ring_group

    cli.add_command(ring_group)
    cli.add_command(log_group)
    cli.add_command(replay)
    bench.add_command(bench_ring)
    bench.add_command(bench_tx)
    bench.add_command(bench_idempotency)
    register(cli)
    # Feature modules that mount their own commands: register(cli, bench).
    for module in ("_sim_cli", "_chaos_cli", "_security_cli"):
        if importlib.util.find_spec(f"txrpc.{module}") is not None:
            importlib.import_module(f"txrpc.{module}").register(cli, bench)


_mount_subcommands()


def main() -> None:
    cli(prog_name="txrpc")


if __name__ == "__main__":
    main()
