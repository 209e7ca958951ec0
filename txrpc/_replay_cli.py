"""``txrpc replay``: re-issue logged requests against a server and compare the answers.

A request log (``txrpc serve --db URL``) keeps, for every call that carried an
idempotency key, the method, the arguments and the outcome that was returned.
``txrpc replay --db URL --target HOST:PORT`` sends the completed ones again, in their
original order (by creation time), to the server at ``--target`` and compares each new
answer with the recorded one. What it is for:

- **checking that a new build reproduces recorded answers** — replay yesterday's
  production log against a staging server running the new version; ``--verify`` makes
  any difference (or a request that got no answer) a non-zero exit, so a CI job or a
  deploy script can gate on it;
- **rebuilding a deterministic service** — a service whose state is a function of the
  requests it received can be rebuilt on an empty server by replaying its log in
  order (the keys travel with the requests, so the new server's own log deduplicates
  again);
- **load replay** — replaying real traffic, paced with ``--rate``, to measure or soak
  a server with production-shaped requests.

Answers are compared as canonical CBOR (so ``1``, ``1.0`` and ``True`` differ, and map
order does not matter); errors compare by code, message and details. A request
answered by the target *from its own request log* (it already had the key: same
database, or replayed twice) is flagged "replayed by target": its handler did not
run, so the comparison proves nothing about it; ``--key-prefix`` gives the keys a
fresh prefix to avoid that.

Each request is sent with the original idempotency key (``--key-prefix`` prepended),
one at a time. Rows written before the request log stored arguments (schema version
4) cannot be re-issued: they are counted as "skipped". The database is opened
read-only; nothing in it is changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any

import click
import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import storage

from ._codec import FrameError, canonical, decode_value
from ._errors import Code, RpcError
from ._log_cli import WHEN, _db_option, _opened

PAGE_ROWS = 500
DIFFERENCES_SHOWN_DEFAULT = 5
#: Errors that say the target could not answer (rather than answered differently).
NO_ANSWER_CODES = frozenset(
    {
        Code.CANCELLED,
        Code.DEADLINE_EXCEEDED,
        Code.UNAVAILABLE,
        Code.RESOURCE_EXHAUSTED,
        Code.PROTOCOL_ERROR,
        Code.REQUEST_IN_PROGRESS,
    }
)
_SHORT_CHARS = 60


@dataclasses.dataclass(frozen=True, slots=True)
class Difference:
    identity: str
    key: str
    method: str
    args: str
    recorded: str
    now: str


@dataclasses.dataclass(slots=True)
class Summary:
    total: int = 0
    sent: int = 0
    identical: int = 0
    different: int = 0
    errors: int = 0
    skipped: int = 0
    replayed_by_target: int = 0
    differences: list[Difference] = dataclasses.field(default_factory=list)
    error_samples: list[str] = dataclasses.field(default_factory=list)
    planned: list[str] = dataclasses.field(default_factory=list)  # dry run: the first few


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHORT_CHARS else text[: _SHORT_CHARS - 1] + "…"


def decode_request(record: storage.RequestRecord) -> tuple[str, list[Any], dict[str, Any]] | None:
    """``(method, args, kwargs)`` as stored (canonical CBOR of ``[method, args, kwargs]``),
    or None when the row has no usable stored request."""
    if record.request is None:
        return None
    try:
        value = decode_value(record.request)
    except FrameError:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not isinstance(value[0], str)
        or not isinstance(value[1], list)
        or not isinstance(value[2], dict)
    ):
        return None
    return value[0], value[1], value[2]


def _recorded_outcome(record: storage.RequestRecord) -> tuple[str, Any]:
    """("value", v) or ("error", (code, message, details)) as recorded."""
    if record.error is not None:
        details: Any = {}
        if record.error.details:
            try:
                details = decode_value(record.error.details)
            except FrameError:
                details = {"undecodable": record.error.details.hex()}
        return "error", (record.error.code, record.error.message, details)
    assert record.response is not None
    try:
        return "value", decode_value(record.response)
    except FrameError:
        return "value", {"undecodable": record.response.hex()}


def _same(left: Any, right: Any) -> bool:
    try:
        return canonical(left) == canonical(right)
    except Exception:  # not canonically encodable: fall back to equality
        return bool(left == right)


def _describe(kind: str, value: Any) -> str:
    if kind == "error":
        code, message, details = value
        try:
            name = Code(code).name
        except ValueError:
            name = f"code {code}"
        return _short(f"{name}: {message}" + (f" {details!r}" if details else ""))
    return _short(value)


async def replay_records(
    db_engine: Any,
    host: str,
    port: int,
    *,
    since: float | None,
    until: float | None,
    method: str | None,
    identity: str | None,
    limit: int | None,
    rate: float | None,
    timeout_s: float,
    key_prefix: str,
    differences_max: int,
    dry_run: bool,
    without_keys: bool = False,
    progress: Any = None,
    on_total: Any = None,
) -> Summary:
    """The replay loop (the CLI wraps it with a progress bar and the summary table)."""
    from ._client import connect

    def read(fn: Any) -> Any:
        with db_engine.connect() as conn, conn.begin():
            return fn(conn)

    def count(conn: Any) -> int:
        return storage.count_replayable(conn, method=method, identity=identity, since=since, until=until)

    total = await trio.to_thread.run_sync(read, count)
    if limit is not None:
        total = min(total, limit)
    summary = Summary(total=total)
    if on_total is not None:
        on_total(total)

    async def run(client: Any) -> None:
        after: tuple[float, str, str] | None = None
        started = time.monotonic()
        seen = 0
        while seen < total:
            page_rows = min(PAGE_ROWS, total - seen)
            cursor = after

            def page(
                conn: Any, cursor: Any = cursor, page_rows: int = page_rows
            ) -> list[storage.RequestRecord]:
                return storage.replay_requests(
                    conn,
                    method=method,
                    identity=identity,
                    since=since,
                    until=until,
                    after=cursor,
                    limit=page_rows,
                )

            records: list[storage.RequestRecord] = await trio.to_thread.run_sync(read, page)
            if not records:
                break
            for record in records:
                seen += 1
                after = (record.created_at, record.identity, record.key)
                await _one(client, record, summary, started, seen)
                if progress is not None:
                    progress()
                if seen >= total:
                    break

    async def _one(client: Any, record: storage.RequestRecord, out: Summary, started: float, n: int) -> None:
        request = decode_request(record)
        if request is None or request[0] != record.method:
            out.skipped += 1
            return
        if dry_run:
            out.sent += 1  # would be sent
            if len(out.planned) < differences_max:
                out.planned.append(f"{record.key}  {request[0]}{_short(tuple(request[1]))}")
            return
        if rate:
            delay = started + (n - 1) / rate - time.monotonic()
            if delay > 0:
                await trio.sleep(delay)
        name, args, kwargs = request
        out.sent += 1
        kind, recorded = _recorded_outcome(record)
        bound = client.options(
            idempotency_key=None if without_keys else key_prefix + record.key,
            with_metadata=True,
            timeout=timeout_s,
            retries_max=0,
        )
        try:
            reply = await bound.call(name, *args, **kwargs)
        except RpcError as exc:
            if exc.code in NO_ANSWER_CODES or exc.details.get("no_request_log") is True:
                out.errors += 1
                if len(out.error_samples) < differences_max:
                    out.error_samples.append(f"{record.key} {name}: {exc}")
                return
            details = {k: v for k, v in exc.details.items() if k != "replayed"}
            if exc.details.get("replayed") is True:
                out.replayed_by_target += 1
            now_kind, now_value = "error", (int(exc.code), exc.message, details)
        else:
            if reply.replayed:
                out.replayed_by_target += 1
            now_kind, now_value = "value", reply.value
        if kind == "error" and now_kind == "error":
            code, message, details = recorded
            same = (
                code == now_value[0] and message == now_value[1] and _same(details or {}, now_value[2] or {})
            )
        else:
            same = kind == now_kind and _same(recorded, now_value)
        if same:
            out.identical += 1
            return
        out.different += 1
        if len(out.differences) < differences_max:
            out.differences.append(
                Difference(
                    record.identity,
                    record.key,
                    name,
                    _short([*args, *[f"{k}={v!r}" for k, v in kwargs.items()]]),
                    _describe(kind, recorded),
                    _describe(now_kind, now_value),
                )
            )

    if dry_run:
        await run(None)
        return summary
    async with connect(host, port) as client:
        await run(client)
    return summary


def _summary_table(summary: Summary, *, dry_run: bool, target: str) -> Table:
    if dry_run:
        table = Table(title=f"replay against {target} — dry run: nothing sent")
        for column in ("requests", "would send", "skipped (no stored request)"):
            table.add_column(column, justify="right")
        table.add_row(str(summary.total), str(summary.sent), str(summary.skipped))
        return table
    table = Table(title=f"replay against {target}")
    columns = ["requests", "sent", "identical", "different", "errors", "skipped (no stored request)"]
    if summary.replayed_by_target:
        columns.append("replayed by target")
    for column in columns:
        table.add_column(column, justify="right")
    row = [
        str(summary.total),
        str(summary.sent),
        str(summary.identical),
        f"[red]{summary.different}[/]" if summary.different else "0",
        f"[red]{summary.errors}[/]" if summary.errors else "0",
        str(summary.skipped),
    ]
    if summary.replayed_by_target:
        row.append(f"[yellow]{summary.replayed_by_target}[/]")
    table.add_row(*row)
    return table


def _differences_table(summary: Summary) -> Table:
    table = Table(title=f"first {len(summary.differences)} of {summary.different} differences")
    for column in ("key", "method", "arguments", "recorded", "now"):
        table.add_column(column, overflow="fold")
    for d in summary.differences:
        table.add_row(d.key, d.method, d.args, d.recorded, d.now)
    return table


def _parse_target(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(
            f"{address!r}: expected HOST:PORT, e.g. 127.0.0.1:12345", param_hint="--target"
        )
    return host.strip("[]") or "127.0.0.1", int(port)


@click.command("replay")
@_db_option
@click.option("--target", metavar="HOST:PORT", help="The server to send the requests to.")
@click.option(
    "--shard",
    metavar="NODE",
    help="Instead of requests: rebuild shard NODE's state from the commit log in --db into --into, check the digest.",
)
@click.option("--into", metavar="PATH|URL", help="With --shard: the empty store to rebuild into.")
@click.option("--since", type=WHEN, help="Only requests created since (24h, ISO date/time, Unix seconds).")
@click.option("--until", type=WHEN, help="Only requests created before this time.")
@click.option("--method", help="Only requests for this method (e.g. bank.deposit).")
@click.option("--identity", help="Only requests of this caller identity.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many requests (the oldest first).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="At most N requests per second.")
@click.option("--verify", is_flag=True, help="Exit with status 1 if any answer differs or is missing.")
@click.option("--dry-run", is_flag=True, help="Count and check what would be sent; send nothing.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Deadline of each request (s).")
@click.option(
    "--key-prefix",
    default="",
    help="Prepend this to every idempotency key (when the target already logged the originals).",
)
@click.option(
    "--without-keys",
    is_flag=True,
    help="Send no idempotency keys (a target without a request log; methods that need one fail).",
)
@click.option(
    "--show",
    "differences_max",
    type=click.IntRange(min=0),
    default=DIFFERENCES_SHOWN_DEFAULT,
    show_default=True,
    help="Differences listed after the summary.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of tables.")
def replay(
    db: str,
    target: str | None,
    shard: str | None,
    into: str | None,
    since: float | None,
    until: float | None,
    method: str | None,
    identity: str | None,
    limit: int | None,
    rate: float | None,
    verify: bool,
    dry_run: bool,
    timeout: float,
    key_prefix: str,
    without_keys: bool,
    differences_max: int,
    as_json: bool,
) -> None:
    """Re-issue logged requests, in their original order, against HOST:PORT and compare
    each answer with the recorded one.

    Use it to check that a new build reproduces recorded answers (with --verify the
    exit status is 1 on any difference), to rebuild a deterministic service from its
    log, or to replay real traffic as load (--rate). The database is opened read-only.

    With --shard NODE --into EMPTY: rebuild that shard's committed state by applying its
    commit log in order to an empty store, and check the digest equals the shard's
    (exit status 1 if not).
    """
    if shard is not None:
        _rebuild(db, shard, into)
        return
    if target is None:
        raise click.UsageError("say --target HOST:PORT (or --shard NODE --into PATH to rebuild a shard)")
    host, port = _parse_target(target)
    console = Console(stderr=as_json)
    with _opened(db, read_only=True) as engine:
        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=as_json,
        ) as bar:
            task = bar.add_task("counting" if dry_run else "replaying", total=None)

            def on_total(total: int) -> None:
                bar.update(task, total=total, description="checking" if dry_run else "replaying")

            try:
                summary = trio.run(
                    lambda: replay_records(
                        engine,
                        host,
                        port,
                        since=since,
                        until=until,
                        method=method,
                        identity=identity,
                        limit=limit,
                        rate=rate,
                        timeout_s=timeout if math.isfinite(timeout) else 10.0,
                        key_prefix=key_prefix,
                        differences_max=differences_max,
                        dry_run=dry_run,
                        without_keys=without_keys,
                        progress=lambda: bar.advance(task),
                        on_total=on_total,
                    )
                )
            except RpcError as exc:
                raise click.ClickException(f"cannot replay against {target}: {exc}") from None
            except storage.StorageError as exc:
                raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "requests": summary.total,
                    "sent": summary.sent,
                    "identical": summary.identical,
                    "different": summary.different,
                    "errors": summary.errors,
                    "skipped": summary.skipped,
                    "replayed_by_target": summary.replayed_by_target,
                    "differences": [dataclasses.asdict(d) for d in summary.differences],
                    "error_samples": summary.error_samples,
                    "planned": summary.planned,
                },
                indent=2,
            )
        )
    else:
        console.print(_summary_table(summary, dry_run=dry_run, target=target))
        if summary.differences:
            console.print(_differences_table(summary))
        for line in summary.planned:
            console.print(f"would send: {line}")
        for sample in summary.error_samples:
            console.print(f"[red]no answer:[/] {sample}")
        if summary.replayed_by_target:
            console.print(
                f"[yellow]{summary.replayed_by_target} answers came from the target's own request log "
                "(it already had those keys): their handlers did not run. Use --key-prefix to re-run them.[/]"
            )
    if verify and not dry_run and (summary.different or summary.errors):
        raise SystemExit(1)


def _rebuild(db: str, shard: str, into: str | None) -> None:
    from ._rebuild import TargetNotEmpty, rebuild_shard

    if into is None:
        raise click.UsageError("--shard needs --into PATH|URL (an empty store to rebuild into)")
    console = Console()
    try:
        with console.status(f"rebuilding shard {shard} from its commit log") as status:

            def progress(applied: int) -> None:
                status.update(f"rebuilding shard {shard}: {applied:,} log entries applied")

            result = trio.run(lambda: rebuild_shard(db, shard, into, on_progress=progress))
    except (TargetNotEmpty, storage.StorageError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"shard {shard}: {result.entries:,} commit-log entries applied into {into}")
    console.print(f"digest of {db}: {result.source_digest}")
    console.print(f"digest rebuilt: {result.rebuilt_digest}")
    if not result.matches:
        console.print("[red bold]the rebuilt state differs from the shard's[/]")
        sys.exit(1)
    console.print("[green]the rebuilt state equals the shard's[/]")
