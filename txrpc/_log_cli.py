"""``txrpc log``: inspect and prune the request log.

Mounted into the main CLI with ``cli.add_command(log)``. Every command takes
``--db`` (a SQLite file or directory, a ``sqlite:///`` URL or a
``postgresql+psycopg://`` URL; env ``TXRPC_DB``). ``ls``, ``show`` and ``stats``
open the database read-only (nothing is created or migrated); ``prune`` writes.
Stored responses and error details are CBOR; they are decoded (with the wire
codec's safe settings) and shown as Python values.

Times given to ``--since`` / ``--older-than`` are a duration back from now
(``90s``, ``15m``, ``24h``, ``7d``, ``2w``), an ISO-8601 date/time (local time
unless it has an offset) or Unix seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.pretty import Pretty
from rich.table import Table
from sqlalchemy.engine import Connection, Engine

import storage

from ._codec import FrameError, decode_value
from ._errors import Code

T = TypeVar("T")

RETENTION_DEFAULT = "24h"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SUMMARY_CHARS_MAX = 48


if TYPE_CHECKING:  # click >= 8.2 types ParamType by its value and input types
    _ParamType = click.ParamType[float, Any]
else:
    _ParamType = click.ParamType


class When(_ParamType):
    """A point in time: ``<n><s|m|h|d|w>`` ago, an ISO-8601 date/time, or Unix seconds."""

    name = "WHEN"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value)
        match = _DURATION.match(text)
        if match:
            return time.time() - float(match.group(1)) * _UNIT_S[match.group(2).lower()]
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            self.fail(f"{text!r}: expected a duration like 24h / 15m / 7d, an ISO date/time or Unix seconds")
        if moment.tzinfo is None:
            moment = moment.astimezone()  # naive: local time
        return moment.timestamp()


WHEN = When()


def _db_option(function: Callable[..., T]) -> Callable[..., T]:
    return click.option(
        "--db",
        "db",
        required=True,
        envvar="TXRPC_DB",
        metavar="URL",
        help="SQLite file or directory, sqlite:/// or postgresql+psycopg:// URL (env TXRPC_DB).",
    )(function)


@contextlib.contextmanager
def _opened(db: str, *, read_only: bool) -> Iterator[Engine]:
    try:
        engine = storage.open_engine(db, create=False, read_only=read_only)
    except storage.StorageError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield engine
    finally:
        engine.dispose()


def _read(engine: Engine, fn: Callable[[Connection], T]) -> T:
    try:
        with engine.connect() as conn, conn.begin():
            return fn(conn)
    except Exception as exc:
        raise click.ClickException(f"reading the request log failed: {exc}") from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds")


def _decoded(data: bytes) -> tuple[bool, Any]:
    """(True, value) if ``data`` is one valid CBOR item, else (False, hex text)."""
    try:
        return True, decode_value(data)
    except FrameError:
        return False, data.hex()


def _code_name(code: int) -> str:
    try:
        return Code(code).name
    except ValueError:
        return f"code {code}"


def _short(text: str) -> str:
    return text if len(text) <= _SUMMARY_CHARS_MAX else text[: _SUMMARY_CHARS_MAX - 1] + "…"


def _outcome_summary(record: storage.RequestRecord, now: float) -> str:
    if record.error is not None:
        return _short(f"{_code_name(record.error.code)}: {record.error.message}")
    if record.response is not None:
        ok, value = _decoded(record.response)
        return _short(repr(value) if ok else f"<undecodable {value}>")
    remaining = record.lease_expires_at - now
    return f"lease ends in {remaining:.0f}s" if remaining > 0 else "lease expired"


def _as_json(record: storage.RequestRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "identity": record.identity,
        "key": record.key,
        "method": record.method,
        "state": record.state.value,
        "attempt": record.attempt,
        "fingerprint": record.fingerprint.hex(),
        "created_at": record.created_at,
        "completed_at": record.completed_at,
        "lease_expires_at": record.lease_expires_at,
        "replay_count": record.replay_count,
        "last_replayed_at": record.last_replayed_at,
    }
    if record.response is not None:
        ok, value = _decoded(record.response)
        out["response"] = value if ok else {"undecodable_hex": value}
    if record.error is not None:
        ok, details = _decoded(record.error.details) if record.error.details else (True, {})
        out["error"] = {
            "code": record.error.code,
            "name": _code_name(record.error.code),
            "message": record.error.message,
            "details": details if ok else {"undecodable_hex": details},
        }
    return out


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=repr))


@click.group(name="log")
def log() -> None:
    """Inspect the request log: idempotency keys and the outcomes recorded for them."""


@log.command("ls")
@_db_option
@click.option(
    "--state",
    type=click.Choice([s.value for s in storage.RequestState]),
    help="Only rows in this state.",
)
@click.option("--method", help="Only rows for this method (e.g. bank.withdraw).")
@click.option("--identity", help="Only rows of this caller identity.")
@click.option("--since", type=WHEN, help="Only rows created since (24h, 2025-01-31T12:00, Unix seconds).")
@click.option(
    "--limit",
    type=click.IntRange(1, storage.LIST_LIMIT_MAX),
    default=50,
    show_default=True,
    help="Newest rows shown at most.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ls(
    db: str,
    state: str | None,
    method: str | None,
    identity: str | None,
    since: float | None,
    limit: int,
    as_json: bool,
) -> None:
    """List logged requests, newest first."""
    with _opened(db, read_only=True) as engine:
        records = _read(
            engine,
            lambda conn: storage.list_requests(
                conn, state=state, method=method, identity=identity, since=since, limit=limit
            ),
        )
    if as_json:
        _echo_json([_as_json(r) for r in records])
        return
    now = time.time()
    plural = "s" if len(records) != 1 else ""
    table = Table(title=f"request log — {len(records)} row{plural} (local time; `show KEY` for details)")
    for column in ("created", "identity", "key", "method", "state", "outcome"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(
            datetime.datetime.fromtimestamp(r.created_at).strftime("%m-%d %H:%M:%S"),
            r.identity,
            r.key,
            r.method,
            r.state.value,
            _outcome_summary(r, now) + (f" (replayed {r.replay_count}x)" if r.replay_count else ""),
        )
    Console().print(table)


@log.command("show")
@click.argument("key")
@_db_option
@click.option("--identity", help="The caller identity (default: every identity that used KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def show(key: str, db: str, identity: str | None, as_json: bool) -> None:
    """Show everything recorded for idempotency key KEY."""
    with _opened(db, read_only=True) as engine:
        if identity is None:
            records = _read(engine, lambda conn: storage.find_requests(conn, key))
        else:
            found = _read(engine, lambda conn: storage.get_request(conn, identity, key))
            records = [] if found is None else [found]
    if not records:
        who = f" for identity {identity!r}" if identity is not None else ""
        raise click.ClickException(f"no request with key {key!r}{who}")
    if as_json:
        _echo_json([_as_json(r) for r in records])
        return
    console = Console()
    now = time.time()
    for r in records:
        table = Table(title=f"{r.identity} / {r.key}", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        table.add_row("method", r.method)
        table.add_row("state", r.state.value)
        table.add_row("attempt", str(r.attempt))
        table.add_row("fingerprint", r.fingerprint.hex())
        table.add_row("created", _when(r.created_at))
        table.add_row("completed", _when(r.completed_at))
        lease = _when(r.lease_expires_at)
        if not r.completed:
            lease += " (expired)" if r.lease_expires_at <= now else " (live)"
        table.add_row("lease until", lease)
        table.add_row("replays", f"{r.replay_count} (last {_when(r.last_replayed_at)})")
        if r.response is not None:
            ok, value = _decoded(r.response)
            table.add_row("response", Pretty(value) if ok else f"<undecodable CBOR> {value}")
        if r.error is not None:
            table.add_row("error", f"{_code_name(r.error.code)} ({r.error.code}): {r.error.message}")
            if r.error.details:
                ok, details = _decoded(r.error.details)
                table.add_row("error details", Pretty(details) if ok else f"<undecodable CBOR> {details}")
        console.print(table)


@log.command("stats")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def stats(db: str, as_json: bool) -> None:
    """Counts by state and method, replays, and requests whose lease has run out."""
    now = time.time()
    with _opened(db, read_only=True) as engine:
        result = _read(engine, lambda conn: storage.request_stats(conn, now))
    if as_json:
        _echo_json(
            {
                "total": result.total,
                "in_progress": result.in_progress,
                "completed": result.completed,
                "errors": result.errors,
                "replays": result.replays,
                "leases_expired": result.leases_expired,
                "oldest_created_at": result.oldest_created_at,
                "newest_created_at": result.newest_created_at,
                "by_method": dict(result.by_method),
            }
        )
        return
    console = Console()
    table = Table(title="request log", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("count", justify="right")
    table.add_row("requests", str(result.total))
    table.add_row("in progress", str(result.in_progress))
    table.add_row("  of which lease expired (stuck)", str(result.leases_expired))
    table.add_row("completed", str(result.completed))
    table.add_row("  of which errors", str(result.errors))
    table.add_row("replays served", str(result.replays))
    table.add_row("oldest", _when(result.oldest_created_at))
    table.add_row("newest", _when(result.newest_created_at))
    console.print(table)
    if result.by_method:
        methods = Table(title="by method")
        methods.add_column("method")
        methods.add_column("requests", justify="right")
        for method, count in result.by_method:
            methods.add_row(method, str(count))
        console.print(methods)


@log.command("prune")
@_db_option
@click.option(
    "--older-than",
    "older_than",
    type=WHEN,
    default=RETENTION_DEFAULT,
    show_default=True,
    help="Retention cut-off: a duration back from now, an ISO date/time or Unix seconds.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
def prune(db: str, older_than: float, dry_run: bool) -> None:
    """Delete completed requests older than the cut-off, and in-progress ones whose
    lease ended before it. A retry of a pruned key runs again as a new request."""
    with _opened(db, read_only=dry_run) as engine:
        database = storage.Database(engine)
        try:
            if dry_run:
                count = database.read_sync(
                    lambda conn: storage.prune_requests(conn, older_than, dry_run=True)
                )
            else:
                count = database.write_sync(lambda conn: storage.prune_requests(conn, older_than))
        except storage.StorageError as exc:
            raise click.ClickException(str(exc)) from None
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {count} request{'s' if count != 1 else ''} (cut-off {_when(older_than)})")
