"""`txrpc bench tx`: cross-shard bank transfers through our coordinator beside PostgreSQL's
own two-phase commit driven from Python (psycopg ``tpc_*`` across three databases), in one run.

Ours: a coordinator and three shard processes on SQLite (``synchronous=FULL``) in a temp
dir; N concurrent clients in this process; each transfer withdraws 1 from an account on
one shard and deposits it on another shard (single-shard row: both on one shard, which
commits in one phase). The peer: the same transfers as ``UPDATE … SET bal = bal ± 1`` in
two of three PostgreSQL databases with PREPARE TRANSACTION / COMMIT PREPARED.

With ``--rounds N`` the stacks run N times, in alternating order (A B C, C B A, ...);
each ratio is the median of the rounds' own ratios (both sides measured minutes apart),
printed with the lowest and highest: these machines' speed drifts within the hour.

Each row also gives the CPU time its whole stack spent per committed transfer (Linux,
from /proc): ours, this process (the clients) and the coordinator's and nodes'
processes; the peer, this process (its psycopg clients) and every PostgreSQL server
process (the postmaster of the bench's backends and its children; "n/a" when the server
is not on this machine). Both sides open their connections before the measurement. When
the machine's cores are all busy, transfers/s follow it. ``--cpu-detail`` prints the
figure split by process too.

PostgreSQL needs ``max_prepared_transactions`` of at least two per client and a free
connection per client and database (``--clients 64`` needs 192; the default
``max_connections`` is 100): ``--pg-setup`` raises what is short (``ALTER SYSTEM SET
max_prepared_transactions = 200``, and ``max_connections`` as needed) and restarts the
local server with ``pg_ctlcluster`` (root on the build machine); without it the bench
says what is short and what to run, and measures txrpc only.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import trio
from rich.console import Console
from rich.table import Table

PG_DSN = os.environ.get("TXRPC_BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname={}")
PG_DATABASES = ("txrpc_bench_s1", "txrpc_bench_s2", "txrpc_bench_s3")
INITIAL_BALANCE = 1_000_000


@dataclass
class Row:
    stack: str
    workload: str
    clients: int
    per_s: float
    p50_ms: float
    p99_ms: float
    retries: int
    conserved: bool
    cpu_ms: float | None = None  # CPU time of the stack's processes per committed transfer
    cpu_by_process: dict[str, float] | None = None  # cpu_ms split by process ("clients", "node a", ...)


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat``'s fields after the command name (the first is the state, stat's
    3rd field), or None if the process is not visible here (gone, another machine or
    container, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu_s(pid: int, *, reaped: bool = False) -> float | None:
    """CPU time (user + system, in seconds) process ``pid`` has used so far; with
    ``reaped``, its waited-for children's too (a PostgreSQL backend that exits is added to
    the postmaster's). None if it is not visible here."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # stat's utime, stime, cutime, cstime (its fields 14..17).
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid``, or None if it is not visible here."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def server_pids(postmaster: int | None) -> list[int]:
    """A local PostgreSQL server's processes: its postmaster (the parent of any of its
    backends) and the postmaster's children; none if the server is not visible here."""
    if postmaster is None:
        return []
    children = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if name.isdigit() and parent_pid(int(name)) == postmaster:
            children.append(int(name))
    return [postmaster, *children]


class CpuMeter:
    """CPU time of a set of processes over a measurement: :meth:`start`, then
    :meth:`per` gives the milliseconds per committed transfer (and leaves them split by
    process name in :attr:`by_process`). ``pids`` is called at each
    end: processes that start meanwhile count from zero. None (no figure) without /proc,
    when ``complete`` is False (some of the stack's processes cannot be seen), or when a
    process of the start is gone at the end and ``reaped`` is False (its time is lost)."""

    def __init__(
        self,
        pids: Callable[[], list[int]],
        *,
        reaped: bool = False,
        complete: bool = True,
        names: dict[int, str] | None = None,
        others: str = "other",
    ) -> None:
        self.pids = pids
        self.reaped = reaped
        self.complete = complete
        self.names = names or {}  # pid -> its name in by_process(); the rest count as ``others``
        self.others = others
        self._start: dict[int, float] | None = None
        self.by_process: dict[str, float] | None = None  # per()'s figure split by process name

    def _each(self) -> dict[int, float] | None:
        """Each process's CPU seconds so far (those gone are left out); None without /proc."""
        if not os.path.isdir("/proc/self"):
            return None
        each = {}
        for pid in self.pids():
            used = process_cpu_s(pid, reaped=self.reaped)
            if used is not None:
                each[pid] = used
        return each

    def start(self) -> None:
        self._start = self._each()

    def per(self, committed: int) -> float | None:
        self.by_process = None
        end = self._each()
        if not committed or not self.complete or not end or self._start is None:
            return None  # (no process of it seen: no figure, rather than 0)
        start = self._start
        if not self.reaped and not start.keys() <= end.keys():
            return None  # one of them exited meanwhile: its time since the start is not known
        # A process alive at both ends counts its difference; one that started meanwhile,
        # all of its time; with ``reaped``, one that exited meanwhile counts in its
        # parent's reaped time (all of its life: the peer keeps its backends open).
        split: dict[str, float] = {}  # (by process name; the unnamed ones under ``others``)
        for pid, value in end.items():
            name = self.names.get(pid, self.others)
            split[name] = split.get(name, 0.0) + (value - start.get(pid, 0.0)) / committed * 1e3
        self.by_process = split
        return sum(split.values())


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] * 1e3


# --- ours ----------------------------------------------------------------------------------


def run_ours(clients: int, seconds: float, accounts: int, console: Console, replication_factor: int = 1) -> list[Row]:
    from ._demo import Processes, write_cluster_file

    with tempfile.TemporaryDirectory(prefix="txrpc-bench-tx-") as tmp:
        config_path = write_cluster_file(Path(tmp), replication_factor=replication_factor)
        processes = Processes(config_path, ["a", "b", "c"])
        try:
            for name in ["coordinator", "a", "b", "c"]:
                processes.start(name)
            for name in ["coordinator", "a", "b", "c"]:
                processes.wait_ready(name)
            names = {os.getpid(): "clients"}
            names.update(
                {proc.pid: name if name == "coordinator" else f"node {name}" for name, proc in processes.procs.items()}
            )
            rows = trio.run(_ours_workload, config_path, clients, seconds, accounts, console, names)
            for row in rows:
                row.stack = f"txrpc R={replication_factor}"
            return rows
        finally:
            processes.stop()


async def _ours_workload(
    config_path: Path, clients: int, seconds: float, accounts: int, console: Console, processes: dict[int, str]
) -> list[Row]:
    from ._cluster import Transaction, cluster

    rows = []
    async with cluster(config_path, rng=random.Random(1)) as c:
        names = [f"acct{i}" for i in range(accounts)]
        shard_of = {n: c.config.shard_map.primary_of(n).name for n in names}
        by_shard: dict[str, list[str]] = {}
        for n in names:
            by_shard.setdefault(shard_of[n], []).append(n)
        with console.status(f"txrpc: opening {accounts} accounts"):
            limiter = trio.CapacityLimiter(64)

            async def open_one(name: str) -> None:
                async with limiter:
                    async with c.transaction() as t:
                        await t.bank.open_account(name, INITIAL_BALANCE)

            async with trio.open_nursery() as nursery:
                for n in names:
                    nursery.start_soon(open_one, n)
        for workload in ("cross-shard (2 of 3)", "1 shard"):
            latencies: list[float] = []
            attempts = [0]
            rng = random.Random(7)

            shards = sorted(by_shard)  # (once: the harness's own work counts in the client's CPU)
            cross = workload.startswith("cross")

            def pick() -> tuple[str, str]:
                if cross:
                    a, b = rng.sample(shards, 2)
                    return rng.choice(by_shard[a]), rng.choice(by_shard[b])
                x, y = rng.sample(by_shard[rng.choice(shards)], 2)
                return x, y

            stop = time.perf_counter() + seconds

            async def worker() -> None:
                while time.perf_counter() < stop:
                    src, dst = pick()

                    async def transfer(t: Transaction) -> None:
                        attempts[0] += 1
                        await t.bank.withdraw(src, 1)
                        await t.bank.deposit(dst, 1)

                    t0 = time.perf_counter()
                    await c.run_transaction(transfer, attempts=100)
                    latencies.append(time.perf_counter() - t0)

            cpu = CpuMeter(lambda: list(processes), names=processes)
            with console.status(f"txrpc: {workload}, {clients} clients, {seconds:g} s"):
                cpu.start()
                t0 = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(clients):
                        nursery.start_soon(worker)
                elapsed = time.perf_counter() - t0
                cpu_ms = cpu.per(len(latencies))
            latencies.sort()
            rows.append(
                Row(
                    "txrpc",
                    workload,
                    clients,
                    len(latencies) / elapsed,
                    _percentile(latencies, 0.5),
                    _percentile(latencies, 0.99),
                    attempts[0] - len(latencies),
                    True,
                    cpu_ms,
                    cpu.by_process,
                )
            )
        total = 0
        for _shard, members in by_shard.items():
            for start in range(0, len(members), 200):
                async with c.transaction() as t:
                    for n in members[start : start + 200]:
                        total += await t.bank.balance(n)
        conserved = total == INITIAL_BALANCE * accounts
        for row in rows:
            row.conserved = conserved
    return rows


# --- PostgreSQL's own 2PC --------------------------------------------------------------------


def pg_limits() -> dict[str, int] | None:
    """The local server's ``max_prepared_transactions``, ``max_connections`` and
    ``superuser_reserved_connections``; ``superuser`` (1 if the bench's role is one: it may
    use the reserved connections too) and ``in_use``, the connections open now (this one
    included). None if the server cannot be reached."""
    try:
        import psycopg
    except ImportError:
        return None
    try:
        with psycopg.connect(PG_DSN.format("postgres"), autocommit=True, connect_timeout=5) as conn:

            def show(name: str) -> str:
                return str(conn.execute(f"show {name}").fetchone()[0])  # type: ignore[index]

            limits = {
                name: int(show(name))
                for name in ("max_prepared_transactions", "max_connections", "superuser_reserved_connections")
            }
            limits["superuser"] = int(show("is_superuser") == "on")
            row = conn.execute("select count(*) from pg_stat_activity where backend_type = 'client backend'")
            limits["in_use"] = int(row.fetchone()[0])  # type: ignore[index]
            return limits
    except psycopg.Error:
        return None


def pg_shortages(limits: dict[str, int], clients: int) -> dict[str, tuple[int, str]]:
    """What the local server lacks to run the peer with ``clients`` clients: each setting
    that is short, with the value ``--pg-setup`` gives it and why (empty if nothing is).
    The peer holds one connection per client and database at once (it closes its set-up
    connection first) and up to two prepared transactions per client."""
    short: dict[str, tuple[int, str]] = {}
    prepared = limits["max_prepared_transactions"]
    if prepared < clients * 2:
        why = (
            "max_prepared_transactions = 0, so its 2PC cannot run"
            if prepared == 0
            else f"max_prepared_transactions = {prepared} is below the {clients * 2} transactions "
            f"{clients} clients may hold prepared at once"
        )
        short["max_prepared_transactions"] = (max(200, clients * 2), why)
    reserved = 0 if limits["superuser"] else limits["superuser_reserved_connections"]
    free = limits["max_connections"] - reserved - (limits["in_use"] - 1)  # (the check's own one closes)
    needed = clients * len(PG_DATABASES)
    if free < needed:
        why = (
            f"{clients} clients need {needed} connections (one per client and database), but "
            f"max_connections = {limits['max_connections']} leaves {free} free"
        )
        short["max_connections"] = (limits["max_connections"] + needed - free + 20, why)  # (and a margin)
    return short


def raise_pg_settings(settings: dict[str, int]) -> None:
    """Raise the local server's ``settings`` (ALTER SYSTEM + restart)."""
    import psycopg

    with psycopg.connect(PG_DSN.format("postgres"), autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute(f"ALTER SYSTEM SET {name} = {int(value)}")
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        limits = pg_limits()
        if limits is not None and all(limits[name] >= value for name, value in settings.items()):
            return
        time.sleep(0.2)
    raise RuntimeError(f"PostgreSQL did not come back with {settings}")


def run_postgres(clients: int, seconds: float, accounts: int) -> Row:
    return asyncio.run(_pg_main(clients, seconds, accounts // len(PG_DATABASES)))


async def _pg_main(clients: int, seconds: float, per_db: int) -> Row:
    import psycopg

    async with await psycopg.AsyncConnection.connect(PG_DSN.format("postgres"), autocommit=True) as admin:
        existing = {r[0] for r in await (await admin.execute("select datname from pg_database")).fetchall()}
        for name in PG_DATABASES:
            if name not in existing:
                await admin.execute(f'create database "{name}"')
    for name in PG_DATABASES:
        async with await psycopg.AsyncConnection.connect(PG_DSN.format(name), autocommit=True) as conn:
            for row in await (await conn.execute("select gid from pg_prepared_xacts")).fetchall():
                await conn.execute(f"rollback prepared '{row[0]}'")
            await conn.execute("drop table if exists acct")
            await conn.execute("create table acct(id int primary key, bal bigint not null)")
            await conn.execute(
                "insert into acct select g, %s from generate_series(0, %s) g", (INITIAL_BALANCE, per_db - 1)
            )

    async def total() -> int:
        value = 0
        for name in PG_DATABASES:
            async with await psycopg.AsyncConnection.connect(PG_DSN.format(name), autocommit=True) as conn:
                row = await (await conn.execute("select sum(bal) from acct")).fetchone()
                value += int(row[0]) if row else 0
        return value

    before = await total()
    latencies: list[float] = []
    retries = [0]
    seq = [0]
    # Every connection is open before the measurement starts and closed after it ends (as
    # ours are): neither side's figures count connecting, and no backend exits meanwhile.
    connections = [
        {d: await psycopg.AsyncConnection.connect(PG_DSN.format(d)) for d in PG_DATABASES} for _ in range(clients)
    ]
    async with await psycopg.AsyncConnection.connect(PG_DSN.format(PG_DATABASES[0]), autocommit=True) as probe:
        backend = (await (await probe.execute("select pg_backend_pid()")).fetchone())[0]  # type: ignore[index]
    postmaster = parent_pid(int(backend))  # None: the server is not this machine's (or not visible)

    async def worker(index: int, stop: float) -> None:
        conns = connections[index]
        rng = random.Random(index)
        while time.perf_counter() < stop:
            a, b = rng.sample(PG_DATABASES, 2)
            ia, ib = rng.randrange(per_db), rng.randrange(per_db)
            seq[0] += 1
            gtrid = f"bench-{index}-{seq[0]}"
            ca, cb = conns[a], conns[b]
            t0 = time.perf_counter()
            try:
                await ca.tpc_begin(ca.xid(1, gtrid, a))
                await cb.tpc_begin(cb.xid(1, gtrid, b))
                await ca.execute("update acct set bal = bal - 1 where id = %s", (ia,))
                await cb.execute("update acct set bal = bal + 1 where id = %s", (ib,))
                await ca.tpc_prepare()
                await cb.tpc_prepare()
                await ca.tpc_commit()
                await cb.tpc_commit()
                latencies.append(time.perf_counter() - t0)
            except psycopg.errors.DeadlockDetected:
                retries[0] += 1
                for conn in (ca, cb):
                    try:
                        await conn.tpc_rollback()
                    except psycopg.Error:
                        await conn.rollback()

    cpu = CpuMeter(
        lambda: [os.getpid(), *server_pids(postmaster)],
        reaped=True,
        complete=postmaster is not None,
        names={os.getpid(): "clients"},
        others="server",
    )
    try:
        cpu.start()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, t0 + seconds) for i in range(clients)))
        elapsed = time.perf_counter() - t0
        cpu_ms = cpu.per(len(latencies))
    finally:
        for conns in connections:
            for conn in conns.values():
                await conn.close()
    after = await total()
    latencies.sort()
    return Row(
        "PG 2PC",
        "cross-shard (2 of 3)",
        clients,
        len(latencies) / elapsed,
        _percentile(latencies, 0.5),
        _percentile(latencies, 0.99),
        retries[0],
        before == after,
        cpu_ms,
        cpu.by_process,
    )


# --- ratios ----------------------------------------------------------------------------------

CROSS, ONE = "cross-shard (2 of 3)", "1 shard"

#: name -> (numerator (stack, workload), denominator (stack, workload), target, label).
#: Each is taken per round (both measured in that round) and summarized over rounds.
#: The targets are the issues'; a replicated shard's single-shard transactions are not
#: one-phase (they go through the coordinator), so that ratio is shown without one.
RATIO_DEFS: dict[str, tuple[tuple[str, str], tuple[str, str], float | None, str]] = {
    "r1_vs_pg": (("txrpc R=1", CROSS), ("PG 2PC", CROSS), 1.0, "PG"),
    "r1_one_vs_cross": (("txrpc R=1", ONE), ("txrpc R=1", CROSS), 2.0, "x-shard"),
    "r2_vs_pg": (("txrpc R=2", CROSS), ("PG 2PC", CROSS), 1.0, "PG"),
    "r2_vs_r1": (("txrpc R=2", CROSS), ("txrpc R=1", CROSS), 0.5, "R=1"),
    "r2_one_vs_cross": (("txrpc R=2", ONE), ("txrpc R=2", CROSS), None, "x-shard"),
    "r3_vs_pg": (("txrpc R=3", CROSS), ("PG 2PC", CROSS), 1.0, "PG"),
    "r3_vs_r1": (("txrpc R=3", CROSS), ("txrpc R=1", CROSS), 0.5, "R=1"),
    "r3_one_vs_cross": (("txrpc R=3", ONE), ("txrpc R=3", CROSS), None, "x-shard"),
}

#: Which ratios a table row shows: the row's stack and workload is the numerator.
RATIOS_OF: dict[tuple[str, str], tuple[str, ...]] = {}
for _name, _definition in RATIO_DEFS.items():
    RATIOS_OF[_definition[0]] = (*RATIOS_OF.get(_definition[0], ()), _name)


@dataclass
class Ratio:
    median: float
    low: float
    high: float
    rounds: int
    target: float | None
    label: str

    @property
    def met(self) -> bool:
        return self.target is None or self.median >= self.target

    @property
    def goal(self) -> str:
        return "" if self.target is None else f"≥{self.target:g}× {self.label}"

    @property
    def shown(self) -> str:
        text = f"{self.median:.2f}× {self.label}"
        if self.rounds > 1:
            text += f" ({self.low:.2f}–{self.high:.2f})"
        return text


def round_orders(factors: list[int], with_pg: bool, rounds: int) -> list[list[int | str]]:
    """The stacks of each round, in order: forward in even rounds and backward in odd
    ones (A B C, C B A, ...), so that a drift of the machine's speed over the run does
    not favour the stack that always runs first."""
    order: list[int | str] = [*factors, *(["pg"] if with_pg else [])]
    return [order if index % 2 == 0 else order[::-1] for index in range(rounds)]


def round_ratios(rows: list[Row]) -> dict[str, float]:
    """The ratios (``RATIO_DEFS``) one round's rows give: both sides measured in it."""
    rate = {(r.stack, r.workload): r.per_s for r in rows}
    found = {}
    for name, (numerator, denominator, _, _) in RATIO_DEFS.items():
        if numerator in rate and rate.get(denominator):
            found[name] = rate[numerator] / rate[denominator]
    return found


def summarize_ratios(per_round: list[dict[str, float]]) -> dict[str, Ratio]:
    """Each ratio's median over the rounds that measured it, with its lowest and highest.
    (A paired measure: each round's ratio compares runs minutes apart, where medians of
    each side taken separately would compare runs up to the whole bench apart.)"""
    summary = {}
    for name, (_, _, target, label) in RATIO_DEFS.items():
        values = [r[name] for r in per_round if name in r]
        if values:
            summary[name] = Ratio(statistics.median(values), min(values), max(values), len(values), target, label)
    return summary


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _median_split(splits: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each process's median over the rounds that measured it."""
    known = [split for split in splits if split]
    if not known:
        return None
    names = sorted({name for split in known for name in split}, key=_process_order)
    return {name: statistics.median(split[name] for split in known if name in split) for name in names}


def _process_order(name: str) -> tuple[int, str]:
    return ({"clients": 0, "coordinator": 1, "server": 3}.get(name, 2), name)


def cpu_split_line(row: Row) -> str | None:
    """``--cpu-detail``'s line for ``row``: its CPU ms per transfer by process."""
    if not row.cpu_by_process:
        return None
    parts = ", ".join(f"{name} {ms:.2f}" for name, ms in row.cpu_by_process.items())
    return f"{row.stack}, {row.workload}: {parts}"


# --- the command ------------------------------------------------------------------------------


@click.command("tx")
@click.option("--clients", default=32, show_default=True, help="Concurrent clients (each side).")
@click.option("--seconds", default=10.0, show_default=True, help="Duration of each measurement.")
@click.option("--accounts", default=3000, show_default=True, help="Accounts (the peer: a third per database).")
@click.option("--rounds", default=1, show_default=True, help="Repetitions; medians are kept.")
@click.option("--no-postgres", is_flag=True, help="Measure txrpc only.")
@click.option(
    "--replication",
    default="1,3",
    show_default=True,
    help="Replication factors to measure (comma-separated; 3 nodes, so at most 3).",
)
@click.option(
    "--pg-setup",
    is_flag=True,
    help="Raise max_prepared_transactions and max_connections as the clients need (ALTER SYSTEM + restart).",
)
@click.option("--cpu-detail", is_flag=True, help="Also print each row's CPU ms per transfer split by process.")
def tx(
    clients: int,
    seconds: float,
    accounts: int,
    rounds: int,
    no_postgres: bool,
    replication: str,
    pg_setup: bool,
    cpu_detail: bool,
) -> None:
    """Cross-shard transfers/s: txrpc's coordinator (at each replication factor) vs
    PostgreSQL's native 2PC."""
    try:
        factors = sorted({int(part) for part in replication.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter("a comma-separated list of integers", param_hint="--replication") from None
    if not factors or not all(1 <= f <= 3 for f in factors):
        raise click.BadParameter(
            "replication factors must be in 1..3 (the bench runs 3 nodes)", param_hint="--replication"
        )
    console = Console(width=max(Console().width, 128))
    with_pg = not no_postgres
    if with_pg:
        limits = pg_limits()
        if limits is None:
            console.print("[yellow]PostgreSQL unreachable at 127.0.0.1:5432: measuring txrpc only[/]")
            with_pg = False
        elif short := pg_shortages(limits, clients):
            why = "; ".join(reason for _, reason in short.values())
            shown = ", ".join(f"{name} = {value}" for name, (value, _) in short.items())
            if pg_setup:
                with console.status(f"setting {shown} and restarting PostgreSQL"):
                    raise_pg_settings({name: value for name, (value, _) in short.items()})
            else:
                console.print(
                    f"[yellow]PostgreSQL: {why}. Measuring txrpc only. Re-run with --pg-setup (runs ALTER "
                    f"SYSTEM SET {shown} and restarts the server with pg_ctlcluster), or do that by hand.[/]"
                )
                with_pg = False
    samples: dict[tuple[str, str], list[Row]] = {}
    per_round: list[dict[str, float]] = []
    for index, order in enumerate(round_orders(factors, with_pg, rounds)):
        measured: list[Row] = []
        for stack in order:
            if stack == "pg":
                with console.status(f"PostgreSQL 2PC: {clients} clients, {seconds:g} s (round {index + 1})"):
                    measured.append(run_postgres(clients, seconds, accounts))
            else:
                measured += run_ours(clients, seconds, accounts, console, int(stack))
        for row in measured:
            samples.setdefault((row.stack, row.workload), []).append(row)
        per_round.append(round_ratios(measured))
    rows = [
        Row(
            stack,
            workload,
            clients,
            statistics.median(r.per_s for r in rs),
            statistics.median(r.p50_ms for r in rs),
            statistics.median(r.p99_ms for r in rs),
            int(statistics.median(r.retries for r in rs)),
            all(r.conserved for r in rs),
            _median_or_none([r.cpu_ms for r in rs]),
            _median_split([r.cpu_by_process for r in rs]),
        )
        for (stack, workload), rs in samples.items()
    ]
    ratios = summarize_ratios(per_round)
    title = f"txrpc bench tx — {clients} clients, {seconds:g} s, {accounts} accounts, medians of {rounds}"
    table = Table(title=title)
    columns = ("stack", "workload", "tx/s", "p50 ms", "p99 ms", "CPU ms/tx", "retries", "total ok", "ratio", "target")
    for column in columns:
        table.add_column(column, justify="left" if column in ("stack", "workload", "target") else "right")
    for r in rows:
        parts = [ratios[key] for key in RATIOS_OF.get((r.stack, r.workload), ()) if key in ratios]
        ratio = ", ".join(p.shown for p in parts)
        target = ", ".join(("[green]met" if p.met else "[red]missed") + f"[/] {p.goal}" for p in parts if p.goal)
        table.add_row(
            r.stack,
            r.workload,
            f"{r.per_s:,.0f}",
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            "n/a" if r.cpu_ms is None else f"{r.cpu_ms:.2f}",
            str(r.retries),
            "yes" if r.conserved else "[red]NO[/]",
            ratio,
            target,
        )
    console.print(table)
    if any(r.cpu_ms is not None for r in rows):
        console.print(
            "CPU ms/tx: CPU time of every process of the stack (its clients in this process included) "
            "per committed transfer; with every core busy, tx/s follow it."
        )
    if cpu_detail:
        lines = [line for line in map(cpu_split_line, rows) if line]
        console.print("CPU ms per transfer by process (medians):" if lines else "CPU ms per transfer: n/a here")
        for line in lines:
            console.print("  " + line, highlight=False)
    if rounds > 1 and ratios:
        console.print(
            "Ratios are medians of each round's own ratio (the two stacks measured minutes apart, "
            "in alternating order), with the rounds' lowest and highest in brackets."
        )
