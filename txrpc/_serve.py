"""Serving services from the command line, optionally with a request log.

``txrpc serve MODULE:SERVICE ... --db URL`` runs :func:`run_serve`: it opens (creates,
migrates) the database at ``URL`` *before* it listens, so a database that is corrupt,
read-only, unreachable or written by a newer txrpc stops the server at start-up with
a message that says what to do, instead of failing calls later. With a database, calls
carrying an idempotency key run at most once per (caller, key) while the key is
retained (``specs/guarantees.md``); without one, such calls are refused with
``FAILED_PRECONDITION``.

:func:`serve_services` is the same as an async function (tests, embedding).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import click
import trio

from . import _env
from ._keyed import LEASE_S_DEFAULT, RETENTION_S_DEFAULT
from ._security import ServerSecurity
from ._server import Server
from ._service import Service

if TYPE_CHECKING:
    from rich.console import Console

    from storage import Storage


class ServeError(click.ClickException):
    """The server could not start (e.g. its request log cannot be opened); exit status 1."""


@asynccontextmanager
async def open_request_log(db: str | os.PathLike[str]) -> AsyncIterator[Storage]:
    """``storage.open_storage(db)`` with start-up failures turned into :class:`ServeError`.

    Opening proves the database is usable for the request log: it creates or migrates
    the schema and makes a probe write, so a corrupt file, a read-only file or
    directory, a schema from a newer txrpc or an unreachable server is reported here.
    """
    import storage

    # The WAL is flushed inside each durable batch's commit, on the event loop's thread
    # (inline writes): on these disks a flush costs less than handing it to a worker
    # thread (pipelined_fsync), ~25 % more keyed calls/s. A slow disk sends batches to
    # worker threads by itself (specs/storage.md, inline writes).
    manager = storage.open_storage(db)
    try:
        opened = await manager.__aenter__()
    except storage.StorageError as exc:
        raise ServeError(f"cannot start: the request log database cannot be used. {exc}") from exc
    try:
        yield opened
    except BaseException as exc:
        if not await manager.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await manager.__aexit__(None, None, None)


def freeze_startup_heap() -> None:
    """Once a server process has started: collect, then move everything allocated so far
    (modules, SQLAlchemy's tables and compiled statements, the services) into the garbage
    collector's permanent generation (``gc.freeze``).

    Those objects live as long as the process; left in view, every full collection walks
    all of them with the event loop stopped. Under load that came every ~0.4 s and took
    25 to 40 ms (``txrpc bench idempotency``: p99 26 to 30 ms, keyed calls/s 20 % lower). For
    the commands that run a server (``txrpc serve``, ``txrpc shard``, ``txrpc coordinator``),
    never for a library user's process: what an embedding application freezes is its call.
    """
    gc.collect()
    gc.freeze()


async def serve_services(
    services: Sequence[Service],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    db: str | os.PathLike[str] | None = None,
    lease_s: float = LEASE_S_DEFAULT,
    retention_s: float = RETENTION_S_DEFAULT,
    wall_clock: Callable[[], float] = _env.wall_time,
    server_options: dict[str, Any] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on ``host:port`` until cancelled; with ``db``, through a request log.

    Raises :class:`ServeError` before listening if ``db`` cannot be used.
    ``server_options`` go to :class:`Server` (``limits``, ``identity_of``, ...).
    """
    options = dict(server_options or {})
    if db is None:
        server = Server(*services, **options)
        await server.serve_tcp(host, port, task_status=task_status)
        return
    async with open_request_log(db) as opened:
        server = Server(
            *services,
            request_log=opened,
            wall_clock=wall_clock,
            lease_s=lease_s,
            retention_s=retention_s,
            **options,
        )
        await server.serve_tcp(host, port, task_status=task_status)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90s``, ``15m``, ``24h``, ``7d``, ``2w`` or plain seconds.

    Raises ``click.BadParameter`` otherwise (or for zero).
    """
    match = _DURATION.match(text)
    if not match:
        raise click.BadParameter(f"{text!r}: expected a duration like 90s, 15m, 24h, 7d or 2w")
    seconds = float(match.group(1)) * _UNIT_S[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise click.BadParameter(f"{text!r}: must be more than zero")
    return seconds


def describe_security(security: ServerSecurity | None) -> str:
    """One line saying how callers are authenticated."""
    if security is None:
        return "security: off (plain TCP, every caller anonymous and allowed everything)"
    parts = []
    if security.ssl_context is not None:
        mode = "mutual TLS" if security.client_cert_required else "TLS"
        parts.append(mode)
    if security.token_verifier is not None:
        parts.append("bearer tokens")
    if security.allow_anonymous:
        parts.append("anonymous callers allowed")
    return "security: " + ", ".join(parts)


def describe_db(db: str | os.PathLike[str]) -> str:
    """The database as shown to people (password hidden)."""
    import storage

    try:
        return storage.display_url(storage.resolve_url(db))
    except storage.StorageError:
        return os.fspath(db)


def run_serve(
    services: Sequence[Service],
    *,
    host: str,
    port: int,
    db: str | None,
    console: Console,
    retention_s: float = RETENTION_S_DEFAULT,
    lease_s: float = LEASE_S_DEFAULT,
    security: ServerSecurity | None = None,
) -> None:
    """What ``txrpc serve`` runs: serve until Ctrl-C, printing where and with what log."""

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            # Open the log before listening: a bad database stops start-up, unwrapped.
            opened = None if db is None else await stack.enter_async_context(open_request_log(db))
            server = Server(
                *services, request_log=opened, lease_s=lease_s, retention_s=retention_s, security=security
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_tcp, host, port)
                names = ", ".join(sorted(server.methods))
                console.print(f"[green]serving[/] {names} on {host}:{server.port} (Ctrl-C to stop)")
                console.print(describe_security(security))
                if db is None:
                    console.print("no request log: calls with an idempotency key are refused (use --db URL)")
                else:
                    console.print(
                        f"request log: {describe_db(db)} (keys kept {retention_s / 3600:g} h, "
                        f"lease {lease_s:g} s)"
                    )
                freeze_startup_heap()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        console.print("stopped")
    except BaseExceptionGroup as group:
        _interrupted, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise
        console.print("stopped")
