"""`txrpc log` (ls / show / stats / prune) through click's CliRunner on populated databases."""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import storage
from txrpc import _idempotency as idem
from txrpc._codec import encode_value
from txrpc._log_cli import log

DAY_S = 86400.0
WIDE = {"COLUMNS": "220"}


def run(*args: str) -> Result:
    return CliRunner().invoke(log, list(args), env=WIDE, catch_exceptions=False)


async def populate(db_url: str) -> float:
    """A request log with every kind of row; returns the 'now' used."""
    now = time.time()
    fp = idem.fingerprint("bank.withdraw", ["alice", 10], {})
    async with storage.open_storage(db_url) as st:
        log_ = st.request_log
        await log_.begin("alice", "pay-1", "bank.withdraw", fp, 30.0, now - 60)
        await log_.complete(
            "alice", "pay-1", 1, now=now - 59, response=encode_value({"balance": 90, "ok": True})
        )
        await log_.note_replay("alice", "pay-1", now - 10)
        await log_.begin("bob", "pay-2", "bank.withdraw", fp, 30.0, now - 50)
        await log_.complete(
            "bob",
            "pay-2",
            1,
            now=now - 49,
            error=storage.StoredError(9, "insufficient funds", encode_value({"balance": 3})),
        )
        await log_.begin("carol", "slow-1", "calc.add", fp, 600.0, now - 20)  # lease live
        await log_.begin("dave", "stuck-1", "calc.add", fp, 5.0, now - 40)  # lease expired
        await log_.begin("bob", "pay-1", "bank.deposit", fp, 30.0, now - 5)  # same key, other identity
        await log_.begin("erin", "ancient", "bank.withdraw", fp, 30.0, now - 3 * DAY_S)
        await log_.complete("erin", "ancient", 1, now=now - 3 * DAY_S + 1, response=encode_value([1, 2, 3]))
    return now


async def test_ls_lists_newest_first_with_readable_outcomes(db_url: str) -> None:
    await populate(db_url)
    result = run("ls", "--db", db_url)
    assert result.exit_code == 0, result.output
    assert "6 rows" in result.output
    lines = result.output.splitlines()
    order = [next(i for i, line in enumerate(lines) if key in line) for key in ("slow-1", "pay-2", "ancient")]
    assert order == sorted(order)  # newest first
    assert "{'balance': 90, 'ok': True}" in result.output  # CBOR response decoded
    assert "FAILED_PRECONDITION: insufficient funds" in result.output
    assert "lease expired" in result.output and "lease ends in" in result.output


async def test_ls_filters(db_url: str) -> None:
    await populate(db_url)
    in_progress = run("ls", "--db", db_url, "--state", "in_progress", "--json")
    assert sorted(r["key"] for r in json.loads(in_progress.output)) == ["pay-1", "slow-1", "stuck-1"]
    by_method = json.loads(run("ls", "--db", db_url, "--method", "calc.add", "--json").output)
    assert sorted(r["key"] for r in by_method) == ["slow-1", "stuck-1"]
    by_identity = json.loads(run("ls", "--db", db_url, "--identity", "bob", "--json").output)
    assert [r["key"] for r in by_identity] == ["pay-1", "pay-2"]
    recent = json.loads(run("ls", "--db", db_url, "--since", "1h", "--json").output)
    assert "ancient" not in {r["key"] for r in recent} and len(recent) == 5
    newest = json.loads(run("ls", "--db", db_url, "--limit", "1", "--json").output)
    assert [(r["identity"], r["key"]) for r in newest] == [("bob", "pay-1")]
    completed = json.loads(run("ls", "--db", db_url, "--state", "completed", "--json").output)
    by_key = {r["key"]: r for r in completed}
    assert by_key["pay-1"]["response"] == {"balance": 90, "ok": True}
    assert by_key["pay-2"]["error"] == {
        "code": 9,
        "name": "FAILED_PRECONDITION",
        "message": "insufficient funds",
        "details": {"balance": 3},
    }


async def test_show_prints_one_key_for_every_identity(db_url: str) -> None:
    await populate(db_url)
    result = run("show", "pay-1", "--db", db_url)
    assert result.exit_code == 0, result.output
    assert "alice / pay-1" in result.output and "bob / pay-1" in result.output
    assert "'balance': 90" in result.output and "1 (last" in result.output  # replay count
    assert idem.fingerprint("bank.withdraw", ["alice", 10], {}).hex() in result.output

    only_bob = run("show", "pay-1", "--db", db_url, "--identity", "bob")
    assert "bob / pay-1" in only_bob.output and "alice" not in only_bob.output
    assert "(live)" in only_bob.output

    error = run("show", "pay-2", "--db", db_url)
    assert "FAILED_PRECONDITION (9): insufficient funds" in error.output
    assert "'balance': 3" in error.output


async def test_show_unknown_key_fails(db_url: str) -> None:
    await populate(db_url)
    result = run("show", "nope", "--db", db_url)
    assert result.exit_code == 1 and "no request with key 'nope'" in result.output
    result = run("show", "pay-2", "--db", db_url, "--identity", "alice")
    assert result.exit_code == 1 and "for identity 'alice'" in result.output


async def test_stats(db_url: str) -> None:
    await populate(db_url)
    data = json.loads(run("stats", "--db", db_url, "--json").output)
    assert (data["total"], data["in_progress"], data["completed"], data["errors"]) == (6, 3, 3, 1)
    assert data["leases_expired"] == 1  # dave's
    assert data["replays"] == 1
    assert data["by_method"] == {"bank.withdraw": 3, "calc.add": 2, "bank.deposit": 1}
    table = run("stats", "--db", db_url)
    assert table.exit_code == 0
    assert "lease expired (stuck)" in table.output and "bank.withdraw" in table.output


async def test_prune(db_url: str) -> None:
    await populate(db_url)
    dry = run("prune", "--db", db_url, "--dry-run")
    assert dry.exit_code == 0 and "would delete 1 request " in dry.output  # default cut-off: 24h
    assert len(json.loads(run("ls", "--db", db_url, "--json").output)) == 6
    pruned = run("prune", "--db", db_url, "--older-than", "30s")
    assert pruned.exit_code == 0, pruned.output
    # ancient (completed 3 days ago), pay-1/alice (completed 59 s ago), pay-2 (49 s ago),
    # stuck-1 (lease ended 35 s ago); kept: slow-1 (live) and bob's pay-1 (live).
    assert "deleted 4 requests" in pruned.output
    left = json.loads(run("ls", "--db", db_url, "--json").output)
    assert sorted((r["identity"], r["key"]) for r in left) == [("bob", "pay-1"), ("carol", "slow-1")]


def test_time_arguments(tmp_path: Any) -> None:
    async def fill() -> None:
        async with storage.open_storage(tmp_path) as st:
            fp = b"\x00" * 16
            await st.request_log.begin("a", "k2020", "m", fp, 1.0, datetime.datetime(2020, 1, 1).timestamp())
            await st.request_log.begin("a", "k2024", "m", fp, 1.0, datetime.datetime(2024, 1, 1).timestamp())

    import trio

    trio.run(fill)
    db = str(tmp_path)
    iso = json.loads(run("ls", "--db", db, "--since", "2023-06-01T00:00", "--json").output)
    assert [r["key"] for r in iso] == ["k2024"]
    epoch = str(datetime.datetime(2019, 1, 1).timestamp())
    assert len(json.loads(run("ls", "--db", db, "--since", epoch, "--json").output)) == 2
    bad = CliRunner().invoke(log, ["ls", "--db", db, "--since", "yesterday-ish"])
    assert bad.exit_code == 2 and "expected a duration like 24h" in bad.output


def test_bad_databases_are_clear_errors(tmp_path: Any) -> None:
    missing = run("ls", "--db", str(tmp_path / "missing.db"))
    assert missing.exit_code == 1 and "no database at" in missing.output
    assert not (tmp_path / "missing.db").exists()  # inspecting never creates

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    corrupt = run("stats", "--db", str(garbage))
    assert corrupt.exit_code == 1 and "not a usable SQLite database" in corrupt.output

    newer = tmp_path / "newer.db"
    storage.open_engine(newer).dispose()
    engine = sa.create_engine(f"sqlite:///{newer}", poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO txrpc_schema VALUES (999, 'future', 0)"))
    engine.dispose()
    too_new = run("prune", "--db", str(newer))
    assert too_new.exit_code == 1 and "schema version 999" in too_new.output


def test_db_from_environment_and_mounting(tmp_path: Any) -> None:
    storage.open_engine(tmp_path).dispose()
    result = CliRunner().invoke(log, ["stats", "--json"], env={"TXRPC_DB": str(tmp_path)})
    assert result.exit_code == 0 and json.loads(result.output)["total"] == 0

    @click.group()
    def main() -> None:
        pass

    main.add_command(log)
    mounted = CliRunner().invoke(main, ["log", "--help"])
    assert mounted.exit_code == 0
    for command in ("ls", "show", "stats", "prune"):
        assert command in mounted.output


@pytest.mark.parametrize("command", ["ls", "show", "stats", "prune"])
def test_every_command_requires_a_database(command: str) -> None:
    args = [command, "KEY"] if command == "show" else [command]
    result = CliRunner().invoke(log, args, env={"TXRPC_DB": ""})
    assert result.exit_code == 2 and "--db" in result.output
