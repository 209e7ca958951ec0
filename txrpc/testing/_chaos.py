"""``txrpc chaos``: a real local cluster under faults, judged from its history.

A coordinator and three shard processes (``txrpc coordinator`` / ``txrpc shard``, SQLite
in a temporary directory) run on loopback. Every connection between two parties — the
clients, the coordinator, shards ``a``, ``b``, ``c`` — goes through its own
:class:`~txrpc.testing._proxy.FaultProxy`, one per ordered pair (*link* ``src->dst``).
Each process reads its own cluster file, in which its own entry is its real listener
and every other entry is the proxy of the link from it to that party; the clients'
file lists the client links' proxies. The parent process (this runner) runs the
proxies, the workload's clients (:class:`txrpc.Cluster`, recording a
:class:`~txrpc.testing._history.History`) and a nemesis in one trio loop.

The nemesis follows a schedule drawn up front from ``random.Random(seed)`` in two
lanes: processes (``kill``: SIGKILL then restart; ``pause``: SIGSTOP then SIGCONT) and
network (``partition``, ``delay``, ``slow``, ``drop``, ``reset``, ``blackhole``, as
proxy toxics). At the end it heals everything, restarts what is down, waits (bounded)
for in-doubt transactions to be decided, takes a final read and runs the checkers.

With ``tls`` (``txrpc chaos --tls``) the runner makes a dev CA and certificates for the
coordinator, each shard, the clients and an admin (``txrpc._certs``; every leaf is valid
for 127.0.0.1, the address of every listener and proxy), and every cluster file gets a
``[security]`` table: mutual TLS on every connection, the processes are the peers. The
proxies forward raw bytes, so TLS runs end to end through them, and a dropped or reset
chunk breaks a TLS session as it breaks a TCP stream. The clients present the ``client``
certificate; the runner's own probes (``coord.transactions``, admin-only, and
``tx.status``) present the ``admin`` one.

The same seed gives the same schedule and the same client choices; the outcome of a
run still depends on real processes, sockets and the OS scheduler, so two runs with one
seed are not identical. Replaying a failure exactly is the simulator's job
(:mod:`txrpc.testing._sim`).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import trio
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import txrpc
from txrpc._demo import Processes

from ._checkers import CheckResult, check_bank, check_list_append, check_termination
from ._history import History
from ._proxy import FaultProxy
from ._workloads import (
    WorkloadOptions,
    _transaction,
    accounts_of,
    bank_client,
    bank_final_read,
    bank_service,
    bank_setup,
    list_append_client,
    list_append_final_read,
    list_append_service,
)

__all__ = [
    "DEFAULT_FAULTS",
    "FAULT_KINDS",
    "WORKLOADS",
    "ChaosError",
    "ChaosOptions",
    "ChaosResult",
    "FaultEvent",
    "plan_faults",
    "render_verdict",
    "run_chaos",
]

# The services the shard processes host (``txrpc shard`` loads them by MODULE:NAME).
bank = bank_service()
la = list_append_service()

WORKLOADS: Final = ("bank", "list-append")
SERVICE_SPECS: Final = {"bank": f"{__name__}:bank", "list-append": f"{__name__}:la"}
FAULT_KINDS: Final = ("kill", "pause", "partition", "delay", "slow", "drop", "reset", "blackhole")
DEFAULT_FAULTS: Final = ("kill", "partition", "delay", "drop", "reset", "blackhole")
PROCESS_FAULTS: Final = ("kill", "pause")
FAULT_HELP: Final = {
    "kill": "SIGKILL a coordinator or shard process, restart it on the same storage after the hold",
    "pause": "SIGSTOP a process for the hold, then SIGCONT (a long GC pause or a stalled VM)",
    "partition": "split the parties in two sides; links across stall both ways (nothing lost, held)",
    "delay": "latency ± 50 % jitter on every link of one party, each direction",
    "slow": "bandwidth limit and 16-byte slices on every link of one party",
    "drop": "per chunk on one party's links: the chunk is lost and the connection closed",
    "reset": "per chunk on one party's links: the chunk is lost and the connection reset (RST)",
    "blackhole": "one process swallows everything sent to or from it; those connections reset after",
}

COORDINATOR: Final = "coordinator"
SHARDS: Final = ("a", "b", "c")
SERVERS: Final = (COORDINATOR, *SHARDS)
CLIENT: Final = "client"
ADMIN: Final = "admin"  # the identity of the runner's in-doubt probes (with TLS)
PARTIES: Final = (CLIENT, *SERVERS)
LOOPBACK: Final = "127.0.0.1"

DURATION_MAX_S: Final = 3600.0
CLIENTS_MAX: Final = 64
SETTLE_MAX_S: Final = 600.0
FAULT_HOLD_S: Final = (1.0, 6.0)  # how long one fault lasts
# Quiet time before the next fault of the same lane. Processes get longer gaps: a
# restart takes a second or two, and locks of transactions orphaned by a kill are only
# freed by the shards' idle timeout (10 s), so shorter gaps leave the cluster degraded
# nearly all the time.
NETWORK_FAULT_GAP_S: Final = (0.5, 3.0)
PROCESS_FAULT_GAP_S: Final = (2.0, 8.0)
TX_TIMEOUT_S: Final = 3.0
THINK_S: Final = 0.01
CLIENT_DRAIN_S: Final = 30.0  # after the duration: bound on clients finishing their last operation
FINAL_READ_TIMEOUT_S: Final = 60.0
OBSERVE_TIMEOUT_S: Final = 5.0
SETTLE_POLL_S: Final = 0.25
PROXY_CONNECTIONS_MAX: Final = 128
SPLIT_TRANSFER_GAP_S: Final = 0.02
FINAL_READ_PROCESS: Final = 999
ANOMALIES_SHOWN_MAX: Final = 10
CERT_DAYS: Final = 1  # the dev certificates of a --tls run
CERTS_DIR: Final = "certs"  # under the run's directory


class ChaosError(RuntimeError):
    """The run could not be carried out (the cluster did not start, setup failed)."""


@dataclasses.dataclass(frozen=True)
class ChaosOptions:
    """One chaos run; ``ValueError`` for anything out of range."""

    workload: str = "bank"
    faults: tuple[str, ...] = DEFAULT_FAULTS
    duration_s: float = 60.0
    seed: int = 0
    clients: int = 4
    settle_s: float = 30.0
    history_path: Path | None = None
    keep_dir: bool = False
    #: Test only: every transfer is two transactions (withdraw, then deposit): not
    #: atomic, so the bank checker must find money missing in concurrent reads.
    split_transfers: bool = False
    #: Mutual TLS on every connection, with certificates from a fresh dev CA.
    tls: bool = False

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; known: {', '.join(WORKLOADS)}")
        unknown = [f for f in self.faults if f not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)}")
        if len(set(self.faults)) != len(self.faults):
            raise ValueError(f"fault kinds listed twice: {', '.join(self.faults)}")
        if not 1.0 <= self.duration_s <= DURATION_MAX_S:
            raise ValueError(f"duration_s must be in 1..{DURATION_MAX_S:g} s, got {self.duration_s!r}")
        if type(self.clients) is not int or not 1 <= self.clients <= CLIENTS_MAX:
            raise ValueError(f"clients must be an integer in 1..{CLIENTS_MAX}, got {self.clients!r}")
        if not 1.0 <= self.settle_s <= SETTLE_MAX_S:
            raise ValueError(f"settle_s must be in 1..{SETTLE_MAX_S:g} s, got {self.settle_s!r}")
        if type(self.seed) is not int:
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if type(self.tls) is not bool:
            raise ValueError(f"tls must be True or False, got {self.tls!r}")
        if self.split_transfers and self.workload != "bank":
            raise ValueError("split_transfers only applies to the bank workload")
        if self.history_path is not None and not self.history_path.parent.is_dir():
            raise ValueError(
                f"cannot write the history to {self.history_path}: no directory {self.history_path.parent}"
            )

    def workload_options(self) -> WorkloadOptions:
        return WorkloadOptions(
            clients=self.clients, duration_s=self.duration_s, think_s=THINK_S, tx_timeout_s=TX_TIMEOUT_S
        )


# ------------------------------------------------------------------------------- schedule


@dataclasses.dataclass(frozen=True)
class FaultEvent:
    """One scheduled fault: ``kind`` on ``nodes`` from ``at_s`` (after the workload
    starts) for ``hold_s``. ``nodes``: the process (kill, pause), one side of the cut
    (partition), or the party whose links suffer (delay, slow, drop, reset, blackhole).
    ``amount``: latency in s (delay), bytes/s (slow), probability per chunk (drop, reset)."""

    at_s: float
    kind: str
    nodes: tuple[str, ...]
    hold_s: float
    amount: float = 0.0

    def __str__(self) -> str:
        who = "+".join(self.nodes)
        what = {
            "kill": f"kill -9 {who}, restart after {self.hold_s:.1f} s",
            "pause": f"SIGSTOP {who} for {self.hold_s:.1f} s",
            "partition": f"partition {who} | {'+'.join(p for p in PARTIES if p not in self.nodes)}",
            "delay": f"delay {who}'s links {self.amount * 1e3:.0f} ms ± {self.amount * 500:.0f} ms",
            "slow": f"slow {who}'s links to {self.amount / 1e3:g} kB/s, 16-byte slices",
            "drop": f"drop {self.amount:.0%} of chunks on {who}'s links",
            "reset": f"reset on {self.amount:.0%} of chunks on {who}'s links",
            "blackhole": f"black hole {who}",
        }[self.kind]
        hold = "" if self.kind in PROCESS_FAULTS else f" for {self.hold_s:.1f} s"
        return f"{what}{hold}"


def plan_faults(seed: int, kinds: Sequence[str], duration_s: float) -> tuple[FaultEvent, ...]:
    """The fault schedule of a run: a function of its arguments only. Process faults and
    network faults form two lanes; within a lane faults do not overlap."""
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {', '.join(unknown)}; known: {', '.join(FAULT_KINDS)}")
    rng = random.Random(seed)
    events: list[FaultEvent] = []
    lanes = [
        [k for k in FAULT_KINDS if k in kinds and k in PROCESS_FAULTS],
        [k for k in FAULT_KINDS if k in kinds and k not in PROCESS_FAULTS],
    ]
    for lane, gap_s in zip(lanes, (PROCESS_FAULT_GAP_S, NETWORK_FAULT_GAP_S), strict=True):
        if not lane:
            continue
        at_s = rng.uniform(*NETWORK_FAULT_GAP_S)
        while at_s < duration_s - 0.5:
            kind = rng.choice(lane)
            hold_s = min(rng.uniform(*FAULT_HOLD_S), duration_s - at_s)
            events.append(_draw_event(rng, kind, round(at_s, 2), round(hold_s, 2)))
            at_s += hold_s + rng.uniform(*gap_s)
    return tuple(sorted(events, key=lambda e: (e.at_s, e.kind)))


def _draw_event(rng: random.Random, kind: str, at_s: float, hold_s: float) -> FaultEvent:
    if kind in ("kill", "pause", "blackhole"):
        return FaultEvent(at_s, kind, (rng.choice(SERVERS),), hold_s)
    if kind == "partition":
        parties = list(PARTIES)
        rng.shuffle(parties)
        return FaultEvent(at_s, kind, tuple(sorted(parties[: rng.choice((1, 2))])), hold_s)
    amount = {
        "delay": (0.01, 0.05, 0.1, 0.25),
        "slow": (2_000.0, 10_000.0, 100_000.0),
        "drop": (0.01, 0.05, 0.2),
        "reset": (0.01, 0.05, 0.2),
    }[kind]
    return FaultEvent(at_s, kind, (rng.choice(PARTIES),), hold_s, rng.choice(amount))


# --------------------------------------------------------------------------------- result


@dataclasses.dataclass
class ChaosResult:
    options: ChaosOptions
    schedule: tuple[FaultEvent, ...]
    history: History
    checks: list[CheckResult]
    in_doubt: dict[Any, str]
    faults_injected: Counter[str]
    network: dict[str, int]
    final_read: bool
    wall_s: float
    workdir: Path | None = None
    #: Each shard's ``tx.status`` after the final read: active (unprepared) and prepared
    #: transactions in its memory, and its commit-log position.
    shard_status: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return all(check.valid for check in self.checks)

    def operation_counts(self) -> dict[str, Counter[str]]:
        """``{f: {"ok": n, "fail": n, "info": n}}``; an operation never completed is info."""
        counts: dict[str, Counter[str]] = {}
        for invoke, done in self.history.pairs():
            counts.setdefault(invoke.f, Counter())[done.type if done is not None else "info"] += 1
        return counts


def render_verdict(result: ChaosResult, console: Console) -> None:
    """Print the verdict tables: operations, faults, checks, anomalies."""
    options = result.options
    title = (
        f"txrpc chaos — {options.workload}{' (split transfers: broken on purpose)' if options.split_transfers else ''}"
        f", seed {options.seed}, {options.duration_s:g} s of faults, {options.clients} clients"
        f"{', mutual TLS' if options.tls else ''}"
    )
    console.print(f"[bold]{title}[/]")
    table = Table(show_header=True)
    table.add_column("")
    table.add_column("ok", justify="right")
    table.add_column("fail", justify="right")
    table.add_column("info", justify="right")
    by_f = result.operation_counts()
    total: Counter[str] = Counter()
    for f, counts in sorted(by_f.items()):
        total.update(counts)
        table.add_row(f"operations: {f}", *(f"{counts[t]:,}" for t in ("ok", "fail", "info")))
    table.add_row("[bold]operations[/]", *(f"[bold]{total[t]:,}[/]" for t in ("ok", "fail", "info")))
    console.print(table)

    facts = Table(show_header=False)
    facts.add_column("what")
    facts.add_column("value")
    injected = " ".join(f"{kind}×{n}" for kind, n in sorted(result.faults_injected.items())) or "none"
    facts.add_row("faults injected", injected)
    net = result.network
    facts.add_row(
        "network (all proxies)",
        f"{net['connections']:,} connections, {net['dropped']:,} dropped, {net['resets']:,} reset, "
        f"{net['blackholed_bytes']:,} B swallowed, {net['connect_failures']:,} to a dead target, "
        f"{net['refused']:,} over the limit",
    )
    for check in result.checks:
        name, _, check_counts, found_types = check.row()
        shown = "[green]valid[/]" if check.valid else f"[red]INVALID[/] {found_types}"
        facts.add_row(f"check: {name}", f"{shown} ({check_counts})")
    facts.add_row(
        "in doubt left",
        str(len(result.in_doubt))
        if not result.in_doubt
        else "[red]" + escape(", ".join(f"{k}: {v}" for k, v in sorted(result.in_doubt.items(), key=str)[:10])) + "[/]",
    )
    facts.add_row("final read", "ok" if result.final_read else "[red]none succeeded[/]")
    facts.add_row("shards at the end", " · ".join(f"{k}: {v}" for k, v in result.shard_status.items()) or "-")
    facts.add_row("wall time", f"{result.wall_s:.1f} s" + (f" (kept: {result.workdir})" if result.workdir else ""))
    anomaly_counts: Counter[str] = Counter()
    for check in result.checks:
        anomaly_counts.update(check.anomaly_counts())
    if result.valid:
        facts.add_row("[bold]verdict[/]", "[bold green]VALID[/] — no anomaly found")
    else:
        found = " ".join(f"{t}×{n}" for t, n in anomaly_counts.items())
        facts.add_row("[bold]verdict[/]", f"[bold red]VIOLATION[/] — {found}")
    console.print(facts)

    anomalies = [(check.name, a) for check in result.checks for a in check.anomalies]
    if anomalies:
        listing = Table(title=f"anomalies (first {min(len(anomalies), ANOMALIES_SHOWN_MAX)} of {len(anomalies)})")
        listing.add_column("check")
        listing.add_column("type")
        listing.add_column("explanation")
        for name, anomaly in anomalies[:ANOMALIES_SHOWN_MAX]:
            listing.add_row(name, escape(str(anomaly["type"])), escape(str(anomaly.get("explanation", ""))))
        console.print(listing)


# --------------------------------------------------------------------------------- runner


def run_chaos(options: ChaosOptions, console: Console | None = None) -> ChaosResult:
    """Run one chaos run (blocking, wall time ≈ startup + duration + settling); print
    progress to ``console`` if given. Raises :class:`ChaosError` if the run could not
    be carried out."""
    say: Callable[[str], None] = console.print if console is not None else (lambda _: None)
    workdir = Path(tempfile.mkdtemp(prefix="txrpc-chaos-"))
    configs = {name: workdir / f"{name}.toml" for name in (*SERVERS, CLIENT)}
    procs = {name: Processes(configs[name], [name]) for name in SERVERS}
    run = _Run(options, workdir, configs, procs, say)
    try:
        return trio.run(run.main)
    except BaseExceptionGroup as group:
        failure = _first(group, ChaosError)
        if failure is not None:
            raise failure from None
        raise
    finally:
        for name in sorted(run.paused):
            _signal(procs[name], name, signal.SIGCONT)
        for proc in procs.values():
            proc.stop()
        if options.keep_dir:
            say(f"kept {workdir} (cluster files, data, process logs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _first(group: BaseExceptionGroup[Any], kind: type[ChaosError]) -> ChaosError | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (found := _first(exc, kind)) is not None:
            return found
    return None


def _signal(procs: Processes, name: str, signum: int) -> None:
    proc = procs.procs.get(name)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signum)


class _Run:
    def __init__(
        self,
        options: ChaosOptions,
        workdir: Path,
        configs: Mapping[str, Path],
        procs: Mapping[str, Processes],
        say: Callable[[str], None],
    ) -> None:
        self.options = options
        self.workdir = workdir
        self.configs = configs
        self.procs = procs
        self.say = say
        self.schedule = plan_faults(options.seed, options.faults, options.duration_s)
        self.real: dict[str, tuple[str, int]] = {}
        self.proxies: dict[tuple[str, str], FaultProxy] = {}
        self.down: set[str] = set()
        self.paused: set[str] = set()
        self.injected: Counter[str] = Counter()
        self.restart_failures: list[str] = []
        self.history = History()
        self.started_at = 0.0
        self.shard_status: dict[str, str] = {}  # at the last in-doubt probe
        self.certs_dir = workdir / CERTS_DIR
        self.admin_credentials: txrpc.Credentials | None = None  # the probes' (with TLS)

    # -- setup -----------------------------------------------------------------------------

    def _config_text(self, viewer: str) -> str:
        def address(party: str) -> tuple[str, int]:
            return self.real[party] if party == viewer else self.proxies[(viewer, party)].address

        data = self.workdir / "data"
        lines = [
            "# generated by txrpc chaos: this party's own entry is its real listener, the others",
            "# are the fault proxies of the links from it",
            "[cluster]",
            "replication_factor = 1",
            "partitions = 256",
            f'data_dir = "{data}"',
            f'services = ["{SERVICE_SPECS[self.options.workload]}"]',
            "",
            "[coordinator]",
            f'host = "{address(COORDINATOR)[0]}"',
            f"port = {address(COORDINATOR)[1]}",
            f'data_dir = "{data / COORDINATOR}"',
            "",
        ]
        for shard in SHARDS:
            host, port = address(shard)
            lines += ["[[nodes]]", f'name = "{shard}"', f'host = "{host}"', f"port = {port}", ""]
        if self.options.tls:
            # Mutual TLS; the processes are the peers, ADMIN the operator; each process
            # presents certs/<its name>.pem, the clients certs/client.pem.
            peers = ", ".join(f'"{name}"' for name in SERVERS)
            lines += [
                "[security]",
                f'ca_file = "{self.certs_dir / "ca.pem"}"',
                f'certs_dir = "{self.certs_dir}"',
                'client_cert = "require"',
                f"peers = [{peers}]",
                f'admins = ["{ADMIN}"]',
                f'client = "{CLIENT}"',
                "",
            ]
        return "\n".join(lines)

    def _make_certs(self) -> None:
        from txrpc._certs import make_dev_certs

        make_dev_certs(self.certs_dir, [*SERVERS, CLIENT, ADMIN], days=CERT_DAYS)

    async def _start(self, name: str) -> None:
        def start() -> None:
            self.procs[name].start(name)
            self.procs[name].wait_ready(name)

        await trio.to_thread.run_sync(start)

    async def main(self) -> ChaosResult:
        wall_start = trio.current_time()
        options = self.options
        # The real listeners' ports stay reserved (bound) while the proxies pick theirs.
        reserved = [socket.socket() for _ in SERVERS]
        try:
            for name, sock in zip(SERVERS, reserved, strict=True):
                sock.bind((LOOPBACK, 0))
                self.real[name] = (LOOPBACK, int(sock.getsockname()[1]))
            async with trio.open_nursery() as nursery:
                await self._start_cluster(nursery, reserved)
                limits = txrpc.Limits(
                    connect_timeout_s=2.0,
                    keepalive_interval_s=1.0,
                    keepalive_timeout_s=2.0,
                    reconnect_backoff_max_s=1.0,
                )
                config = txrpc.load_cluster_config(self.configs[CLIENT])
                credentials = None
                if config.security is not None:  # --tls
                    credentials = config.security.credentials_for(CLIENT)
                    self.admin_credentials = config.security.credentials_for(ADMIN)
                cluster = txrpc.Cluster(config, limits=limits, rng=random.Random(options.seed), credentials=credentials)
                async with cluster:
                    result = await self._workload(cluster)
                nursery.cancel_scope.cancel()
        finally:
            for sock in reserved:
                sock.close()
        result.wall_s = trio.current_time() - wall_start
        result.workdir = self.workdir if options.keep_dir else None
        if options.history_path is not None:
            self.history.dump(options.history_path)
        return result

    async def _start_cluster(self, nursery: trio.Nursery, reserved: list[socket.socket]) -> None:
        """Proxies in ``nursery``, cluster files, then the processes."""
        options = self.options
        for src in PARTIES:
            for dst in SERVERS:
                if src != dst:
                    proxy = FaultProxy(
                        *self.real[dst],
                        name=f"{src}->{dst}",
                        rng=random.Random(f"{options.seed}:{src}->{dst}"),
                        connections_max=PROXY_CONNECTIONS_MAX,
                    )
                    await nursery.start(proxy.run)
                    self.proxies[(src, dst)] = proxy
        if options.tls:
            try:
                await trio.to_thread.run_sync(self._make_certs)
            except (OSError, ValueError) as exc:
                raise ChaosError(f"could not make the dev certificates in {self.certs_dir}: {exc}") from None
        for name, path in self.configs.items():
            path.write_text(self._config_text(name))
        self.say(
            f"starting a coordinator and shards {', '.join(SHARDS)} in {self.workdir} "
            f"behind {len(self.proxies)} fault proxies"
            + (" (mutual TLS: certificates from a fresh dev CA)…" if options.tls else "…")
        )
        for sock in reserved:
            sock.close()
        try:
            async with trio.open_nursery() as starting:
                for name in SERVERS:
                    starting.start_soon(self._start, name)
        except BaseExceptionGroup as group:
            raise ChaosError(f"the cluster did not start: {group.exceptions[0]}") from None

    # -- the run ---------------------------------------------------------------------------

    async def _workload(self, cluster: txrpc.Cluster) -> ChaosResult:
        options = self.options
        wopts = options.workload_options()
        rng = random.Random(options.seed ^ 0xC4A05)
        total = 0
        if options.workload == "bank":
            try:
                with trio.fail_after(60):
                    total = await bank_setup(cluster, wopts)
            except (RuntimeError, trio.TooSlowError) as exc:
                raise ChaosError(f"could not open the bank accounts: {exc!r}") from None
        self.say(
            f"{options.workload} workload: {options.clients} clients for {options.duration_s:g} s, "
            f"faults {','.join(options.faults) or 'none'}, seed {options.seed}"
        )
        self.started_at = start = trio.current_time()
        until = start + options.duration_s
        counter = [0]

        async def client(index: int) -> None:
            client_rng = random.Random(rng.random())
            if options.workload == "list-append":
                await list_append_client(cluster, self.history, index, client_rng, wopts, until, counter)
            elif options.split_transfers:
                await _split_transfer_client(cluster, self.history, index, client_rng, wopts, until)
            else:
                await bank_client(cluster, self.history, index, client_rng, wopts, until)

        with trio.move_on_at(until + CLIENT_DRAIN_S):
            async with trio.open_nursery() as clients:
                for index in range(options.clients):
                    clients.start_soon(client, index)
                async with trio.open_nursery() as nemesis:
                    nemesis.start_soon(self._lane, [e for e in self.schedule if e.kind in PROCESS_FAULTS])
                    nemesis.start_soon(self._lane, [e for e in self.schedule if e.kind not in PROCESS_FAULTS])
                    await trio.sleep_until(until)
                    nemesis.cancel_scope.cancel()
                await self._heal_all()
        await self._heal_all()  # again, in case the drain bound cut the first one short
        faults_stopped_at = trio.current_time()
        self.say(f"{faults_stopped_at - start:6.1f}s  faults stopped: healed, all processes up; settling…")

        in_doubt = await self._settle(faults_stopped_at + options.settle_s)
        checks = [
            check_termination(
                in_doubt, faults_stopped_at=faults_stopped_at, deadline_s=options.settle_s, now=trio.current_time()
            )
        ]
        final_read = False
        reads_started_at = trio.current_time()
        with trio.move_on_after(FINAL_READ_TIMEOUT_S):
            while not final_read:  # each call tries up to 50 times; the bound is the whole minute
                if options.workload == "bank":
                    final_read = await bank_final_read(cluster, self.history, wopts) is not None
                else:
                    final_read = await list_append_final_read(cluster, self.history, wopts)
        reads_s = trio.current_time() - reads_started_at
        await self._in_doubt()  # the shards' state at the end, for the verdict
        if options.workload == "bank":
            checks.insert(0, check_bank(self.history, accounts=accounts_of(wopts), total=total))
        else:
            checks.insert(0, check_list_append(self.history))
        checks.append(self._liveness(final_read, reads_s))
        network: Counter[str] = Counter()
        for proxy in self.proxies.values():
            network.update(proxy.stats.as_dict())
        return ChaosResult(
            options=options,
            schedule=self.schedule,
            history=self.history,
            checks=checks,
            in_doubt=in_doubt,
            faults_injected=self.injected,
            network=dict(network),
            final_read=final_read,
            wall_s=0.0,
            shard_status=dict(sorted(self.shard_status.items())),
        )

    def _liveness(self, final_read: bool, reads_s: float) -> CheckResult:
        anomalies: list[dict[str, Any]] = [
            {"type": "restart-failed", "explanation": why} for why in self.restart_failures
        ]
        if not final_read:
            attempts = sum(1 for op in self.history if op.process == FINAL_READ_PROCESS and op.type == "invoke")
            anomalies.append(
                {
                    "type": "no-final-read",
                    "explanation": "after healing and restarting everything, no final read transaction "
                    f"succeeded in {attempts} attempts over {reads_s:.0f} s",
                }
            )
        return CheckResult(
            valid=not anomalies,
            name="liveness",
            anomalies=anomalies,
            counts={"final_read": int(final_read), "restart_failures": len(self.restart_failures)},
        )

    # -- the nemesis -----------------------------------------------------------------------

    def _note(self, text: str) -> None:
        self.say(f"{trio.current_time() - self.started_at:6.1f}s  {text}")

    async def _lane(self, events: Sequence[FaultEvent]) -> None:
        for event in events:
            await trio.sleep_until(self.started_at + event.at_s)
            if event.kind in PROCESS_FAULTS:
                await self._process_fault(event)
            else:
                await self._network_fault(event)

    def _links_of(self, party: str) -> list[FaultProxy]:
        return [proxy for (src, dst), proxy in self.proxies.items() if party in (src, dst)]

    async def _network_fault(self, event: FaultEvent) -> None:
        self.injected[event.kind] += 1
        self._note(str(event))
        a = event.amount
        try:
            if event.kind == "partition":
                side = set(event.nodes)
                for (src, dst), proxy in self.proxies.items():
                    if (src in side) != (dst in side):
                        proxy.set_toxic(paused=True)
            else:
                party = event.nodes[0]
                for proxy in self._links_of(party):
                    if event.kind == "delay":
                        proxy.set_toxic(latency_s=a, jitter_s=a / 2)
                    elif event.kind == "slow":
                        proxy.set_toxic(bandwidth_bytes_per_s=int(a), slice_bytes=16, slice_delay_s=0.001)
                    elif event.kind == "drop":
                        proxy.set_toxic(drop_p=a)
                    elif event.kind == "reset":
                        proxy.set_toxic(reset_p=a)
                    elif event.kind == "blackhole":
                        proxy.set_toxic(blackhole=True)
            await trio.sleep(event.hold_s)
        finally:
            for proxy in self.proxies.values():
                proxy.heal()

    async def _process_fault(self, event: FaultEvent) -> None:
        (name,) = event.nodes
        if name in self.down or name in self.paused:
            return
        self.injected[event.kind] += 1
        self._note(str(event))
        if event.kind == "pause":
            _signal(self.procs[name], name, signal.SIGSTOP)
            self.paused.add(name)
            try:
                await trio.sleep(event.hold_s)
            finally:
                _signal(self.procs[name], name, signal.SIGCONT)
                self.paused.discard(name)
            return
        self.down.add(name)  # first: if we are cancelled below, the final heal restarts it
        await trio.to_thread.run_sync(self.procs[name].kill9, name)
        await trio.sleep(event.hold_s)
        await self._restart(name)

    async def _restart(self, name: str) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._start(name)
            except RuntimeError as exc:
                self.restart_failures.append(f"{name} did not restart after kill -9: {exc}")
                self._note(f"[red]{name} did not restart[/]: {exc}")
                return
            self.down.discard(name)
            self._note(f"{name} restarted")

    async def _heal_all(self) -> None:
        for proxy in self.proxies.values():
            proxy.heal()
        for name in sorted(self.paused):
            _signal(self.procs[name], name, signal.SIGCONT)
        self.paused.clear()
        async with trio.open_nursery() as nursery:
            for name in sorted(self.down):
                nursery.start_soon(self._restart, name)

    # -- observation -----------------------------------------------------------------------

    async def _settle(self, deadline: float) -> dict[Any, str]:
        """Poll until nothing is in doubt or ``deadline``; returns what is left."""
        while True:
            left = await self._in_doubt()
            if not left or trio.current_time() >= deadline:
                return left
            await trio.sleep(SETTLE_POLL_S)

    async def _in_doubt(self) -> dict[Any, str]:
        """Transactions undecided somewhere: prepared on a shard, or being prepared or in
        phase 2 at the coordinator. Asked over direct connections (no proxy), with the
        admin's credentials under TLS; a process that does not answer counts as unknown."""
        doubt: dict[Any, str] = {}

        async def ask(name: str) -> None:
            host, port = self.real[name]
            try:
                with trio.fail_after(OBSERVE_TIMEOUT_S):
                    async with txrpc.connect(host, port, credentials=self.admin_credentials) as client:
                        if name == COORDINATOR:
                            for tx in await client.call("coord.transactions", True, 1000):
                                doubt.setdefault(int(tx["txid"]), f"{tx['phase']} at the coordinator")
                        else:
                            status = await client.call("tx.status")
                            for txid in status["prepared"]:
                                doubt[int(txid)] = f"prepared on {name}"
                            self.shard_status[name] = (
                                f"{status['active']} active, {len(status['prepared'])} prepared, "
                                f"log position {status['position']}"
                            )
            except (txrpc.RpcError, OSError, trio.TooSlowError) as exc:
                doubt[f"{name}?"] = f"{name} did not answer: {exc!r}"

        async with trio.open_nursery() as nursery:
            for name in SERVERS:
                nursery.start_soon(ask, name)
        return doubt


async def _split_transfer_client(
    cluster: txrpc.Cluster, history: History, process: int, rng: random.Random, options: WorkloadOptions, until: float
) -> None:
    """The bank client, broken on purpose (test only): a transfer is a withdraw
    transaction, then a deposit transaction. A read in between sees money missing."""
    accounts = accounts_of(options)
    while trio.current_time() < until:
        if rng.random() < 0.2:
            invoke = history.invoke(process, "read", None, trio.current_time())

            async def read_all(t: Any) -> dict[str, int]:
                return {a: int(await t.bank.balance(a)) for a in accounts}

            status, value = await _transaction(cluster, read_all, options.tx_timeout_s)
            history.complete(invoke, status, value if status == "ok" else None, trio.current_time())  # type: ignore[arg-type]
        else:
            source, target = rng.sample(accounts, 2)
            amount = rng.randint(1, 5)
            transfer = {"from": source, "to": target, "amount": amount}
            invoke = history.invoke(process, "transfer", transfer, trio.current_time())

            async def withdraw(t: Any, s: str = source, n: int = amount) -> None:
                await t.bank.withdraw(s, n)

            async def deposit(t: Any, d: str = target, n: int = amount) -> None:
                await t.bank.deposit(d, n)

            status, _ = await _transaction(cluster, withdraw, options.tx_timeout_s)
            if status == "ok":
                await trio.sleep(SPLIT_TRANSFER_GAP_S)
                second, _ = await _transaction(cluster, deposit, options.tx_timeout_s)
                status = "ok" if second == "ok" else "info"
            history.complete(invoke, status, transfer, trio.current_time())  # type: ignore[arg-type]
        await trio.sleep(options.think_s * rng.uniform(0.5, 1.5))


def default_seed() -> int:
    """A fresh seed for a run that was not given one (printed, so it can be repeated)."""
    return int.from_bytes(os.urandom(4), "big")
