"""``txrpc replay``: re-issue a request log against a target server and compare answers."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result

import storage
import txrpc
from txrpc._replay_cli import replay


def calc_service(version: int = 1, served: list[str] | None = None) -> txrpc.Service:
    """A deterministic service; version 2 changed ``add`` for a == 2."""
    calc = txrpc.Service("calc")

    @calc.method
    async def add(a: int, b: int) -> int:
        if served is not None:
            served.append("add")
        return a + b + (1 if version == 2 and a == 2 else 0)

    @calc.method
    async def greet(name: str, punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    @calc.method
    async def div(a: int, b: int) -> float:
        if b == 0:
            raise txrpc.InvalidArgument("division by zero", {"a": a})
        return a / b

    @calc.method(idempotent=True)
    async def tally(amount: int) -> int:
        # A service whose state is a function of the requests, in order.
        store = txrpc.current_call().store
        total = int(await store.get("total", default=0)) + amount
        store.put("total", total)
        return total

    return calc


@contextlib.contextmanager
def server_thread(service: txrpc.Service, db: str | None = None) -> Iterator[int]:
    """Serve ``service`` on its own thread and trio loop (the CLI runs trio itself)."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        async def main() -> None:
            async with contextlib.AsyncExitStack() as stack:
                log = None if db is None else await stack.enter_async_context(storage.open_storage(db))
                server = txrpc.Server(service, request_log=log)
                async with trio.open_nursery() as nursery:
                    await nursery.start(server.serve_tcp, "127.0.0.1", 0)
                    state.update(
                        port=server.port, token=trio.lowlevel.current_trio_token(), scope=nursery.cancel_scope
                    )
                    ready.set()

        try:
            trio.run(main)
        finally:
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30) and "port" in state, "server thread did not start"
    try:
        yield int(state["port"])
    finally:
        trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
        thread.join(30)


CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("calc.add", (1, 2), {}),
    ("calc.tally", (5,), {}),
    ("calc.add", (2, 2), {}),
    ("calc.greet", ("ann",), {"punctuation": "?"}),
    ("calc.div", (1, 0), {}),
    ("calc.tally", (7,), {}),
    ("calc.div", (9, 3), {}),
    ("calc.add", (2, 40), {}),
    ("calc.tally", (-2,), {}),
]


def record(db: str, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = CALLS) -> list[Any]:
    """Serve version 1 with a request log at ``db`` and make ``calls`` with keys, in order."""

    async def main() -> list[Any]:
        answers: list[Any] = []
        async with storage.open_storage(db) as st:
            server = txrpc.Server(calc_service(1), request_log=st)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_tcp, "127.0.0.1", 0)
                async with txrpc.connect("127.0.0.1", server.port) as client:
                    for n, (method, args, kwargs) in enumerate(calls):
                        try:
                            answers.append(
                                await client.options(idempotency_key=f"r{n:03d}").call(
                                    method, *args, **kwargs
                                )
                            )
                        except txrpc.RpcError as exc:
                            answers.append(exc)
                        await trio.sleep(0.002)  # distinct creation times: a total order
                nursery.cancel_scope.cancel()
        return answers

    return trio.run(main)


def run_replay(db: str, port: int, *extra: str) -> Result:
    return CliRunner().invoke(
        replay, ["--db", db, "--target", f"127.0.0.1:{port}", *extra], catch_exceptions=False
    )


def summary_of(result: Result) -> dict[str, Any]:
    assert result.output.strip().startswith("{"), result.output
    return json.loads(result.output)  # type: ignore[no-any-return]


@pytest.fixture
def recorded(db_url: str) -> str:
    record(db_url)
    return db_url


def test_verify_passes_when_a_build_reproduces_the_recorded_answers(recorded: str, tmp_path: Path) -> None:
    fresh = f"sqlite:///{tmp_path / 'target.db'}"
    with server_thread(calc_service(1), db=fresh) as port:
        result = run_replay(recorded, port, "--verify", "--json")
    assert result.exit_code == 0, result.output
    summary = summary_of(result)
    assert summary["requests"] == summary["sent"] == summary["identical"] == len(CALLS)
    assert (
        summary["different"] == summary["errors"] == summary["skipped"] == summary["replayed_by_target"] == 0
    )
    # Replayed in order against an empty server, the stateful method rebuilt the same state.
    engine = storage.open_engine(fresh, create=False, read_only=True)
    try:
        with engine.connect() as conn:
            assert storage.kv_items(conn, "") == {"total": 10}
    finally:
        engine.dispose()


def test_verify_fails_and_shows_the_differences_when_behaviour_changed(recorded: str) -> None:
    with _target_with_log(calc_service(2)) as port:
        result = run_replay(recorded, port, "--verify")
    with _target_with_log(calc_service(2)) as port:
        summary = summary_of(run_replay(recorded, port, "--json"))  # without --verify: exit 0
    assert result.exit_code == 1, result.output
    assert "different" in result.output and "calc.add" in result.output
    assert summary["different"] == 2 and summary["identical"] == len(CALLS) - 2
    recorded_answers = sorted(d["recorded"] for d in summary["differences"])
    now_answers = sorted(d["now"] for d in summary["differences"])
    assert recorded_answers == ["4", "42"] and now_answers == ["43", "5"]


def test_a_target_without_a_request_log(recorded: str) -> None:
    with server_thread(calc_service(1)) as port:
        refused = run_replay(recorded, port, "--verify", "--json")
        without_keys = run_replay(recorded, port, "--without-keys", "--json")
    assert refused.exit_code == 1
    assert summary_of(refused)["errors"] == len(CALLS)  # every keyed call refused: nothing compared
    summary = summary_of(without_keys)
    # The methods that need a key fail; the others are compared as usual.
    assert summary["identical"] == len(CALLS) - 3 and summary["different"] == 3


@contextlib.contextmanager
def _target_with_log(service: txrpc.Service) -> Iterator[int]:
    with contextlib.ExitStack() as stack:
        import tempfile

        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="txrpc-replay-target-"))
        yield stack.enter_context(server_thread(service, db=directory))


def test_dry_run_sends_nothing(recorded: str) -> None:
    served: list[str] = []
    with _target_with_log(calc_service(1, served)) as port:
        result = run_replay(recorded, port, "--dry-run", "--verify")
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output and "would send: r000  calc.add(1, 2)" in result.output
    assert served == []


def test_filters_pick_the_requests_in_their_original_order(recorded: str) -> None:
    with _target_with_log(calc_service(1)) as port:
        adds = summary_of(run_replay(recorded, port, "--method", "calc.add", "--json"))
        first_three = summary_of(run_replay(recorded, port, "--limit", "3", "--key-prefix", "b-", "--json"))
        future = summary_of(run_replay(recorded, port, "--since", str(time.time() + 3600), "--json"))
        past = summary_of(run_replay(recorded, port, "--until", "0", "--json"))
    assert adds["requests"] == adds["identical"] == 3
    assert first_three["requests"] == first_three["identical"] == 3
    assert future["requests"] == 0 and past["requests"] == 0


def test_a_target_sharing_the_log_answers_from_it_and_is_flagged(recorded: str) -> None:
    served: list[str] = []
    with server_thread(calc_service(1, served), db=recorded) as port:
        same_keys = summary_of(run_replay(recorded, port, "--json"))
        fresh_keys = summary_of(
            run_replay(recorded, port, "--key-prefix", "again-", "--method", "calc.add", "--json")
        )
    assert same_keys["replayed_by_target"] == len(CALLS) and served == ["add"] * 3
    assert fresh_keys["replayed_by_target"] == 0 and fresh_keys["identical"] == 3


def test_rows_without_a_stored_request_are_skipped(db_url: str) -> None:
    async def legacy_row() -> None:
        async with storage.open_storage(db_url) as st:
            fp = txrpc._idempotency.fingerprint("calc.add", [1, 1], {})
            await st.request_log.begin("anonymous", "old", "calc.add", fp, 30.0, 1.0)  # no request bytes
            await st.request_log.complete("anonymous", "old", 1, now=2.0, response=b"\x02")

    trio.run(legacy_row)
    record(db_url, CALLS[:2])
    with _target_with_log(calc_service(1)) as port:
        summary = summary_of(run_replay(db_url, port, "--json", "--verify"))
    assert summary["requests"] == 3 and summary["skipped"] == 1 and summary["identical"] == 2


def test_rate_paces_the_requests(recorded: str) -> None:
    with _target_with_log(calc_service(1)) as port:
        started = time.monotonic()
        summary = summary_of(run_replay(recorded, port, "--rate", "40", "--json"))
        elapsed = time.monotonic() - started
    assert summary["identical"] == len(CALLS)
    assert elapsed >= (len(CALLS) - 1) / 40


def test_an_unreachable_target_is_an_error(recorded: str) -> None:
    result = CliRunner().invoke(replay, ["--db", recorded, "--target", "127.0.0.1:1"])
    assert result.exit_code == 1 and "cannot replay against 127.0.0.1:1" in result.output


def test_a_missing_database_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(replay, ["--db", str(tmp_path / "nope.db"), "--target", "127.0.0.1:1"])
    assert result.exit_code == 1 and "no database" in result.output
