"""A server process for tests/test_idempotency_processes.py (run as a script).

Serves ``t.bump(account, amount)``, an idempotent method that counts each execution
durably (one line appended and fsynced to ``--runs-file``), adds ``amount`` to
``account`` through the request's own store transaction and returns the new balance.
``--crash-in-handler`` makes the process SIGKILL itself inside the handler, after
counting the run and before anything is recorded. The crash point after the log
commit is txrpc's own: ``TXRPC_CRASH_AT=server.after_log_commit``.

When listening it writes its port to ``--ready-file`` (atomically).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
from pathlib import Path
from typing import Any

import trio

import txrpc
from txrpc._serve import serve_services


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--runs-file", required=True)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--crash-in-handler", action="store_true")
    options = parser.parse_args()

    svc = txrpc.Service("t")

    @svc.method(idempotent=True)
    async def bump(account: str, amount: int) -> dict[str, Any]:
        call = txrpc.current_call()
        line = f"{call.idempotency_key} {call.attempt} {os.getpid()}\n".encode()
        fd = os.open(options.runs_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        store = call.store
        balance = await store.get(account, default=0)
        store.put(account, balance + amount)
        if options.crash_in_handler:
            os.kill(os.getpid(), signal.SIGKILL)
        if options.delay:
            await trio.sleep(options.delay)
        return {"balance": balance + amount, "pid": os.getpid()}

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server: txrpc.Server = await nursery.start(
                functools.partial(
                    serve_services, [svc], port=options.port, db=options.db, lease_s=options.lease
                )
            )
            ready = Path(options.ready_file)
            partial = ready.with_suffix(".tmp")
            partial.write_text(str(server.port))
            partial.rename(ready)

    trio.run(run)


if __name__ == "__main__":
    main()
