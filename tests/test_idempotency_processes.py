"""Idempotency across real server processes: SIGKILL at the worst moments, restarts on
the same database, and two processes sharing one request log.

The server is ``tests/_idem_server.py`` (``t.bump``: counts each execution durably in a
file, adds through the request's store transaction). Every test runs on SQLite and,
with TXRPC_TEST_POSTGRES_URL set, PostgreSQL.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import storage
import txrpc

HELPER = Path(__file__).with_name("_idem_server.py")
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


class ServerProcess:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port

    def wait_dead(self, timeout_s: float = 10.0) -> int:
        return self.process.wait(timeout=timeout_s)


@contextlib.contextmanager
def server_process(
    tmp_path: Path,
    db: str,
    name: str,
    *,
    crash_at: str | None = None,
    crash_in_handler: bool = False,
    lease_s: float = 30.0,
    delay_s: float = 0.0,
) -> Iterator[ServerProcess]:
    ready = tmp_path / f"{name}.port"
    ready.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TXRPC_CRASH_AT"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if crash_at is not None:
        env["TXRPC_CRASH_AT"] = crash_at
    argv = [
        sys.executable,
        str(HELPER),
        "--db",
        db,
        "--ready-file",
        str(ready),
        "--runs-file",
        str(tmp_path / "runs.log"),
        "--lease",
        str(lease_s),
        "--delay",
        str(delay_s),
    ]
    if crash_in_handler:
        argv.append("--crash-in-handler")
    process = subprocess.Popen(argv, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"server {name} exited with {process.returncode} before listening")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {name} did not start within {START_TIMEOUT_S} s")
            time.sleep(0.02)
        yield ServerProcess(process, int(ready.read_text()))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def runs(tmp_path: Path) -> list[tuple[str, int, int]]:
    path = tmp_path / "runs.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        key, attempt, pid = line.split()
        out.append((key, int(attempt), int(pid)))
    return out


def log_row(db: str, key: str) -> storage.RequestRecord | None:
    engine = storage.open_engine(db, create=False, read_only=True)
    try:
        with engine.connect() as conn:
            return storage.get_request(conn, "anonymous", key)
    finally:
        engine.dispose()


def balances(db: str) -> dict[str, Any]:
    engine = storage.open_engine(db, create=False, read_only=True)
    try:
        with engine.connect() as conn:
            return storage.kv_items(conn, "")
    finally:
        engine.dispose()


async def call_bump(port: int, key: str, account: str, amount: int, **options: Any) -> Any:
    async with txrpc.connect("127.0.0.1", port) as client:
        return await client.options(idempotency_key=key, **options).t.bump(account, amount)


async def test_a_reply_lost_to_a_crash_after_the_log_commit_is_replayed_by_the_restarted_server(
    tmp_path: Path, db_url: str
) -> None:
    with server_process(tmp_path, db_url, "a", crash_at="server.after_log_commit") as first:
        with pytest.raises(txrpc.Unavailable):
            await call_bump(first.port, "k1", "alice", 10, retries_max=0)
        assert first.wait_dead() == -signal.SIGKILL
    # The outcome was durable before the reply that never left: the effect and the
    # record are both there, written by the one execution.
    record = log_row(db_url, "k1")
    assert record is not None and record.completed
    assert balances(db_url) == {"alice": 10}
    assert [key for key, _, _ in runs(tmp_path)] == ["k1"]
    with server_process(tmp_path, db_url, "b") as second:
        reply = await call_bump(second.port, "k1", "alice", 10, with_metadata=True)
    assert reply.replayed and reply.value["balance"] == 10
    assert reply.value["pid"] == first.process.pid  # the answer the dead process computed
    assert [key for key, _, _ in runs(tmp_path)] == ["k1"]  # the handler ran once
    assert balances(db_url) == {"alice": 10}


async def test_a_crash_mid_handler_is_retried_after_the_lease_and_applies_once(
    tmp_path: Path, db_url: str
) -> None:
    lease_s = 4.0
    with server_process(tmp_path, db_url, "a", crash_in_handler=True, lease_s=lease_s) as first:
        started = time.time()
        with pytest.raises(txrpc.Unavailable):
            await call_bump(first.port, "k2", "bob", 7, retries_max=0)
        assert first.wait_dead() == -signal.SIGKILL
    # Killed between its store writes and the outcome: neither is in the database.
    record = log_row(db_url, "k2")
    assert record is not None and not record.completed and record.attempt == 1
    assert balances(db_url) == {}
    # The lease runs from the server's claim (stored, wall clock), not from `started`,
    # which is earlier: wait for the stored expiry, not for one computed here.
    assert started < record.lease_expires_at <= time.time() + lease_s
    with server_process(tmp_path, db_url, "b", lease_s=lease_s) as second:
        if time.time() < record.lease_expires_at - 0.5:  # the dead executor's lease still holds
            with pytest.raises(txrpc.RequestInProgress):
                await call_bump(second.port, "k2", "bob", 7, retries_max=0)
        while time.time() < record.lease_expires_at + 0.2:
            await trio.sleep(0.1)
        reply = await call_bump(second.port, "k2", "bob", 7, with_metadata=True)
    assert not reply.replayed and reply.value == {"balance": 7, "pid": second.process.pid}
    # At-least-once for what the handler did outside the store: it ran twice...
    assert [(key, attempt) for key, attempt, _ in runs(tmp_path)] == [("k2", 1), ("k2", 2)]
    # ...exactly-once for what it wrote through the request's store transaction.
    assert balances(db_url) == {"bob": 7}
    record = log_row(db_url, "k2")
    assert record is not None and record.completed and record.attempt == 2


async def test_two_server_processes_sharing_one_request_log_execute_a_duplicate_once(
    tmp_path: Path, db_url: str
) -> None:
    keys = [f"dup-{n}" for n in range(12)]
    answers: dict[str, list[Any]] = collections.defaultdict(list)
    with (
        server_process(tmp_path, db_url, "a", delay_s=0.05) as one,
        server_process(tmp_path, db_url, "b", delay_s=0.05) as two,
    ):
        async with (
            txrpc.connect("127.0.0.1", one.port) as client_one,
            txrpc.connect("127.0.0.1", two.port) as client_two,
        ):

            async def send(client: txrpc.Client, key: str) -> None:
                bound = client.options(idempotency_key=key, wait=True, timeout=30)
                answers[key].append(await bound.t.bump(key, 1))

            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(send, client_one, key)
                    nursery.start_soon(send, client_two, key)
    executed = collections.Counter(key for key, _, _ in runs(tmp_path))
    assert executed == dict.fromkeys(keys, 1)  # each key once, whichever process won
    pids = {pid for _, _, pid in runs(tmp_path)}
    assert pids <= {one.process.pid, two.process.pid}
    for key in keys:
        assert len(answers[key]) == 2 and answers[key][0] == answers[key][1]  # both got the one answer
    assert balances(db_url) == dict.fromkeys(keys, 1)
