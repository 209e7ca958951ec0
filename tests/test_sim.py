"""The deterministic simulator runs the production coordinator and shards under faults.

Each run is one ``trio.run`` on a MockClock; a failing run's message carries the seed
and the schedule that replay it. ``TXRPC_SIM_EXAMPLES=N`` explores N schedules per
workload in the property tests (default: a CI-sized number).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txrpc.testing import Fault, SimOptions, WorkloadOptions, fault_schedules, run_simulation

EXAMPLES = int(os.environ.get("TXRPC_SIM_EXAMPLES", "12"))
SHORT = WorkloadOptions(clients=3, duration_s=2.0)


def assert_valid(result) -> None:  # type: ignore[no-untyped-def]
    assert result.valid, result.report()


def digest(result) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(result.history.to_jsonl().encode()).hexdigest()


FAULTS = (
    Fault(0.3, "crash", "s1"),
    Fault(0.8, "restart", "s1"),
    Fault(0.5, "drop", "coordinator", "s0", 0.15),
    Fault(0.9, "reorder", "s0", "coordinator", 0.2),
    Fault(1.2, "crash", "coordinator"),
    Fault(1.5, "restart", "coordinator"),
)


@pytest.mark.parametrize("workload", ["bank", "list-append", "idempotency"])
def test_fault_free_run_is_valid_and_busy(workload: str) -> None:
    result = run_simulation(1, workload=workload, workload_options=SHORT)
    assert_valid(result)
    counts = result.counts()
    assert counts["ok"] > 100, result.report()
    assert counts["info"] == 0, result.report()


@pytest.mark.parametrize("faulty", [False, True])
def test_transfers_whose_operations_run_at_once_stay_valid(faulty: bool) -> None:
    """Transfers that withdraw in two concurrent operations on one account, with the
    deposit beside them (one transaction), on four accounts: its operations wait for
    their turn at the shard and for locks other transactions hold. Money is conserved and
    the history is serializable, with faults and without."""
    options = WorkloadOptions(clients=6, duration_s=2.0, accounts=4, concurrent_p=0.7)
    for seed in range(2):
        result = run_simulation(seed, workload="bank", faults=FAULTS if faulty else (), workload_options=options)
        assert_valid(result)
        assert result.counts()["ok"] > 50, result.report()


def test_same_seed_replays_exactly_and_another_seed_differs() -> None:
    first = run_simulation(7, workload="bank", faults=FAULTS, workload_options=SHORT)
    again = run_simulation(7, workload="bank", faults=FAULTS, workload_options=SHORT)
    other = run_simulation(8, workload="bank", faults=FAULTS, workload_options=SHORT)
    assert digest(first) == digest(again)
    assert first.crashes == again.crashes
    assert digest(first) != digest(other)


def test_seed_replays_in_another_process() -> None:
    """What the failure message promises: the same seed (and PYTHONHASHSEED) in a new process."""
    script = textwrap.dedent(
        """
        import hashlib
        from txrpc.testing import Fault, WorkloadOptions, run_simulation
        faults = (Fault(0.3, "crash", "s1"), Fault(0.8, "restart", "s1"), Fault(0.5, "drop", "c0", "s0", 0.05))
        options = WorkloadOptions(clients=3, duration_s=1.0)
        r = run_simulation(11, workload="list-append", faults=faults, workload_options=options)
        print(hashlib.sha256(r.history.to_jsonl().encode()).hexdigest())
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    outputs = {
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(outputs) == 1 and len(outputs.pop()) == 65


@pytest.mark.parametrize("workload", ["bank", "list-append"])
def test_crashes_partitions_and_message_faults_keep_the_guarantees(workload: str) -> None:
    result = run_simulation(3, workload=workload, faults=FAULTS, workload_options=SHORT)
    assert_valid(result)
    assert [c[1] for c in result.crashes] == ["s1", "coordinator"]
    assert result.network["dropped"] > 0


@pytest.mark.parametrize(
    "point", ["coordinator.after_decision", "participant.after_prepare", "participant.before_commit_apply"]
)
def test_crash_points_at_the_protocol_edges(point: str) -> None:
    options = SimOptions(crash_points={point: 0.05}, restart_after_s=0.3)
    result = run_simulation(5, workload="bank", options=options, workload_options=SHORT)
    assert_valid(result)
    assert any(why == point for _, _, why in result.crashes), f"{point} never fired: {result.report()}"


def test_buggify_points_fire_and_keep_the_guarantees() -> None:
    # A short run may reach only some points (e.g. no decision write when every commit
    # it tried aborted): a few seeds, every one valid, each point fired in one of them.
    points = ("participant.slow_prepare", "participant.slow_commit_ack", "coordinator.slow_decision_write",
              "storage.slow_io")  # fmt: skip
    fired: dict[str, int] = {}
    for seed in (9, 10, 11, 12):
        options = SimOptions(buggify_p=1.0)
        result = run_simulation(seed, workload="bank", options=options, workload_options=SHORT)
        assert_valid(result)
        assert "--buggify 1" in result.replay_command()  # the replay has them too
        assert options.buggify_p == 1.0  # the run's end (heal) turned them off for that run only
        for point, count in result.buggified.items():
            fired[point] = fired.get(point, 0) + count
    assert all(fired.get(point, 0) > 0 for point in points), fired


# --- property-based: Hypothesis generates the schedule, a failure shrinks to a minimal one

NODES = ("coordinator", "s0", "s1", "s2")


def explored(max_examples: int) -> settings:
    """Hypothesis settings of a generated-schedule test: reproducible (derandomized, no
    example database), no deadline (a run takes seconds), ``max_examples`` schedules."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )


@pytest.mark.parametrize("workload", ["bank", "list-append"])
def test_generated_fault_schedules(workload: str) -> None:
    @explored(EXAMPLES)
    @given(seed=st.integers(0, 2**32 - 1), faults=fault_schedules(NODES, ("c0", "c1", "c2"), duration_s=2.0))
    def run(seed: int, faults: tuple[Fault, ...]) -> None:
        assert_valid(run_simulation(seed, workload=workload, faults=faults, workload_options=SHORT))

    run()


def test_generated_schedules_for_idempotency_keys() -> None:
    @settings(max_examples=max(EXAMPLES // 2, 3), deadline=None, derandomize=True, database=None)
    @given(seed=st.integers(0, 2**32 - 1), faults=fault_schedules(("keyed",), ("c0", "c1", "c2"), duration_s=2.0))
    def run(seed: int, faults: tuple[Fault, ...]) -> None:
        assert_valid(run_simulation(seed, workload="idempotency", faults=faults, workload_options=SHORT))

    run()


# --- the suite must catch broken protocols


def test_catches_a_server_that_skips_the_request_log_lookup() -> None:
    faults = (Fault(0.2, "drop", "keyed", "c0", 0.3), Fault(0.2, "drop", "keyed", "c1", 0.3))
    honest = run_simulation(3, workload="idempotency", faults=faults, workload_options=SHORT)
    assert_valid(honest)
    broken = run_simulation(
        3,
        workload="idempotency",
        faults=faults,
        options=SimOptions(broken=frozenset({"server.skip_request_log_lookup"})),
        workload_options=SHORT,
    )
    assert not broken.valid
    assert "duplicate-execution" in broken.checks[0].anomaly_types, broken.report()


def _crash_the_coordinator_often() -> tuple[Fault, ...]:
    crashes = [Fault(t / 10, "crash", "coordinator") for t in range(3, 20, 3)]
    restarts = [Fault(t / 10 + 0.1, "restart", "coordinator") for t in range(3, 20, 3)]
    return (
        Fault(0.1, "drop", "coordinator", "s1", 0.5),
        Fault(0.1, "drop", "coordinator", "s2", 0.3),
        *crashes,
        *restarts,
    )


def _crash_shards_often() -> tuple[Fault, ...]:
    return tuple(
        fault
        for t in range(2, 19, 2)
        for fault in (Fault(t / 10, "crash", f"s{t % 3}"), Fault(t / 10 + 0.1, "restart", f"s{t % 3}"))
    )


BROKEN_CASES = {
    # A lost decision record: after a restart the coordinator presumes abort for a
    # transaction some shards already committed.
    "coordinator.skip_decision_write": (_crash_the_coordinator_often(), SimOptions()),
    # A shard that lost the transaction (crash) votes no; committing anyway commits half.
    "coordinator.commit_without_all_votes": (_crash_shards_often(), SimOptions()),
    # Another transaction reads and overwrites what a prepared one is about to commit.
    "participant.release_locks_at_prepare": ((), SimOptions()),
}
CONTENDED = WorkloadOptions(clients=6, duration_s=2.0, accounts=4)


@pytest.mark.parametrize("switch", sorted(BROKEN_CASES))
def test_catches_a_broken_commit_protocol(switch: str) -> None:
    """The bank checker finds the broken variant within a few seeds; the honest protocol
    passes the same seed and schedule."""
    faults, options = BROKEN_CASES[switch]
    broken_options = dataclasses.replace(options, broken=frozenset({switch}))
    for seed in range(8):
        broken = run_simulation(
            seed, workload="bank", faults=faults, options=broken_options, workload_options=CONTENDED
        )
        if not broken.valid:
            assert "wrong-total" in broken.checks[0].anomaly_types or "negative" in str(broken.checks[0])
            honest = run_simulation(
                seed, workload="bank", faults=faults, options=dataclasses.replace(options), workload_options=CONTENDED
            )
            assert_valid(honest)
            return
    pytest.fail(f"{switch}: no seed in 0..7 exposed the broken protocol")


def test_trio_internals_the_replay_promise_relies_on_are_present() -> None:
    """deterministic_trio degrades silently if trio's internals move; this makes it loud."""
    from trio._core import _run

    assert hasattr(_run, "_ALLOW_DETERMINISTIC_SCHEDULING")
    assert hasattr(_run.Deadlines, "add") and hasattr(_run.Deadlines, "expire")
    assert "_counter" in {a.name for a in _run.Task.__attrs_attrs__}
    assert hasattr(_run.CancelStatus, "__attrs_post_init__")
    assert isinstance(_run._r, __import__("random").Random)
    # Cancel statuses are made by the module-level name, so they come out hashed by
    # creation order (not by address) while deterministic_trio is on.
    import trio

    from txrpc.testing._sim import deterministic_trio

    async def status_type() -> str:
        with trio.CancelScope() as scope:
            return type(scope._cancel_status).__name__

    with deterministic_trio(1):
        assert trio.run(status_type) == "OrderedCancelStatus"
    assert trio.run(status_type) == "CancelStatus"


# --- replicated shards: replica faults and the replica-consistency checker

REPLICATED = SimOptions(replication_factor=3)
PRIMARY_LOSS = (
    Fault(0.4, "crash", "s0"),
    Fault(0.6, "mark-down", "s0"),  # the authority fails it over
    Fault(1.0, "restart", "s0"),  # back with stale data...
    Fault(1.2, "rejoin", "s0"),  # ...caught up while transfers run
    Fault(1.4, "delay", "s0", "s1", 0.05),  # a lagging follower link
    Fault(1.5, "partition", "s1", "coordinator"),  # s1 cut off from the authority...
    Fault(1.6, "mark-down", "s1"),  # ...and deposed: it must not commit any more
    Fault(1.9, "heal"),
)


@pytest.mark.parametrize("workload", ["bank", "list-append"])
def test_primary_loss_failover_rejoin_and_a_deposed_primary_keep_the_guarantees(workload: str) -> None:
    result = run_simulation(3, workload=workload, faults=PRIMARY_LOSS, options=REPLICATED, workload_options=SHORT)
    assert_valid(result)
    names = [check.name for check in result.checks]
    assert "replica-consistency" in names
    assert "--replication 3" in result.replay_command()
    assert result.counts()["ok"] > 20


# Ring moves with R = 3 of 4 nodes: a node removed (the others copy its partitions), a
# primary lost and failed over meanwhile, the removed node added back (it copies about
# three quarters of the partitions and becomes primary of some): all while transfers run.
RING = SimOptions(shards=4, replication_factor=3)
RING_MOVES = (
    Fault(0.3, "remove-node", "s3"),
    Fault(0.7, "crash", "s1"),
    Fault(0.8, "mark-down", "s1"),
    Fault(1.0, "restart", "s1"),
    Fault(1.1, "add-node", "s3"),
    Fault(1.5, "rejoin", "s1"),
)


@pytest.mark.parametrize("workload", ["bank", "list-append"])
def test_ring_moves_while_transactions_run_keep_the_guarantees(workload: str) -> None:
    result = run_simulation(4, workload=workload, faults=RING_MOVES, options=RING, workload_options=SHORT)
    assert_valid(result)
    assert "--shards 4 --replication 3" in result.replay_command()
    assert result.counts()["ok"] > 20


def test_catches_a_follower_that_acknowledges_commits_it_drops() -> None:
    options = dataclasses.replace(REPLICATED, broken=frozenset({"replication.follower_skips_commit"}))
    broken = run_simulation(1, workload="bank", faults=(), options=options, workload_options=SHORT)
    assert not broken.valid
    replica = next(check for check in broken.checks if check.name == "replica-consistency")
    assert not replica.valid and "divergent-replicas" in replica.anomaly_types
    assert_valid(run_simulation(1, workload="bank", faults=(), options=REPLICATED, workload_options=SHORT))


def test_generated_schedules_with_replica_faults() -> None:
    @explored(max(EXAMPLES // 2, 3))
    @given(
        seed=st.integers(0, 2**32 - 1),
        faults=fault_schedules(NODES, ("c0", "c1", "c2"), duration_s=2.0, replicated=True),
    )
    def run(seed: int, faults: tuple[Fault, ...]) -> None:
        # buggify too: slow prepares, acks and disks widen the windows a move races with.
        options = dataclasses.replace(REPLICATED, buggify_p=0.5)
        assert_valid(run_simulation(seed, workload="bank", faults=faults, options=options, workload_options=SHORT))

    run()


MOVE_STORM = (
    Fault(0.3, "remove-node", "s3"),
    Fault(0.9, "add-node", "s3"),
    Fault(1.4, "remove-node", "s0"),
    Fault(1.8, "add-node", "s0"),
)


@pytest.mark.parametrize("seed", [17, 715])
def test_a_move_storm_under_buggify_keeps_the_guarantees(seed: int) -> None:
    """Two nodes removed and added back in turn while eight clients transfer, under
    buggify (slow prepares, acks, decision writes and disks). Seed 17 destroyed money on
    the code before the 2026-12-06 replication fixes (snapshot waits, record epochs and
    slots): a read summing to 597 of 600. Seed 715 found the next one after them: a
    transaction read at s0, s0 left the partition and came back as its primary while
    another primary committed a transfer to that key, and the stale read committed (the
    read fence passed at the new epoch) -- a transaction whose shard map changed since
    its first operation at a shard now votes no there."""
    options = dataclasses.replace(RING, buggify_p=0.5)
    busy = WorkloadOptions(clients=8, duration_s=2.5)
    result = run_simulation(seed, workload="bank", faults=MOVE_STORM, options=options, workload_options=busy)
    assert_valid(result)


def test_generated_schedules_with_ring_moves() -> None:
    """R = 3 of 4 nodes: nodes removed and added back, marked down and rejoined, under
    generated network and node faults and buggify."""

    @explored(max(EXAMPLES // 4, 3))
    @given(
        seed=st.integers(0, 2**32 - 1),
        faults=fault_schedules((*NODES, "s3"), ("c0", "c1", "c2"), duration_s=2.0, replicated=True),
        moved=st.sampled_from(["s0", "s1", "s2", "s3"]),
        removed_at=st.floats(0.1, 1.0).map(lambda t: round(t, 2)),
        back_after=st.floats(0.1, 1.0).map(lambda t: round(t, 2)),
    )
    def run(seed: int, faults: tuple[Fault, ...], moved: str, removed_at: float, back_after: float) -> None:
        # Always one node removed and added back, among whatever else the schedule does.
        move = (Fault(removed_at, "remove-node", moved), Fault(removed_at + back_after, "add-node", moved))
        options = dataclasses.replace(RING, buggify_p=0.5)
        result = run_simulation(seed, workload="bank", faults=(*faults, *move), options=options, workload_options=SHORT)
        assert_valid(result)

    run()


# A primary cut off from the authority while it is failed over, then reachable again: it
# never installed the new epoch and still serves the clients that have not learned it.
DEPOSED = (Fault(0.5, "partition", "coordinator", "s0"), Fault(0.55, "mark-down", "s0"), Fault(0.8, "heal"))


def test_catches_a_follower_that_takes_writes_from_a_deposed_primary() -> None:
    """Without the epoch check at followers, the deposed primary commits transfers that
    read stale balances (money is created or lost); with it, the same seed is valid."""
    # The window is short (until the deposed primary hears of the new epoch), so
    # contention is high and several seeds are tried (the first that exposes it is 47;
    # it moves with the protocol's timing: 23 before commit notices waited to ride).
    contended = WorkloadOptions(clients=8, duration_s=2.0, accounts=3)
    options = dataclasses.replace(REPLICATED, broken=frozenset({"replication.follower_ignores_epoch"}))
    for seed in range(120):
        broken = run_simulation(seed, workload="bank", faults=DEPOSED, options=options, workload_options=contended)
        if not broken.valid:
            assert "wrong-total" in broken.checks[0].anomaly_types, broken.report()
            honest = run_simulation(
                seed, workload="bank", faults=DEPOSED, options=REPLICATED, workload_options=contended
            )
            assert_valid(honest)
            return
    pytest.fail("no seed in 0..119 exposed the follower that ignores epochs")


def test_sim_explore_runs_ring_moves_from_the_command_line() -> None:
    from click.testing import CliRunner

    from txrpc.cli import cli

    runner = CliRunner()
    explored = runner.invoke(
        cli, ["sim", "explore", "--shards", "4", "--replication", "3", "--buggify", "0.5", "--schedules", "2"]
    )
    assert explored.exit_code == 0, explored.output
    assert "2 schedules" in explored.output and "0 violations" in explored.output
    refused = runner.invoke(cli, ["sim", "run", "--shards", "2", "--replication", "3"])
    assert refused.exit_code != 0 and "at least as many --shards" in refused.output


def test_sim_explore_runs_the_same_schedules_with_any_number_of_workers() -> None:
    """Schedules are drawn up front and each run is replayed by its seed: two worker
    processes find exactly what one process finds (the same operations, counted)."""
    import re

    from click.testing import CliRunner

    from txrpc.cli import cli

    runner = CliRunner()
    summaries = []
    for workers in ("1", "2"):
        result = runner.invoke(
            cli, ["sim", "explore", "--schedules", "4", "--duration", "1", "--workers", workers, "--seed", "7"]
        )
        assert result.exit_code == 0, result.output
        match = re.search(r"4 schedules, (\d+) operations, 0 violations, 0 crashed runs", result.output)
        assert match, result.output
        assert f"{workers} worker" in result.output
        summaries.append(int(match.group(1)))
    assert summaries[0] == summaries[1] > 0


def test_bench_sim_reports_one_process_and_simulations_side_by_side() -> None:
    from click.testing import CliRunner

    from txrpc.cli import cli

    result = CliRunner().invoke(
        cli, ["bench", "sim", "--transactions", "60", "--rounds", "1", "--clients", "4", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "round 1, one process:" in result.output
    assert "round 1, 2 processes:" in result.output and "(each " in result.output
    assert result.output.count("(≥ 1,000)") == 2  # a verdict for each row: one process, two side by side


def test_ctrl_c_stops_sim_explore_and_its_workers_at_once() -> None:
    """A terminal's Ctrl-C (SIGINT to the whole process group) ends `sim explore
    --workers 2` promptly: its workers ignore it and are stopped by the parent, not
    left to finish a schedule (or start another)."""
    import signal
    import time

    from txrpc.testing._sim import _sim_root

    before = set(_sim_root().glob("txrpc-sim-*"))
    command = [sys.executable, "-m", "txrpc.cli", "sim", "explore", "--duration", "30", "--workers", "2"]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # As in a terminal's foreground job: a test run started in the background by a
        # non-interactive shell ignores SIGINT, and its children would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        time.sleep(4)  # the workers are well into their first schedules
        os.killpg(process.pid, signal.SIGINT)
        started = time.monotonic()
        process.communicate(timeout=20)
        assert time.monotonic() - started < 5
        assert process.returncode != 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)  # anyone left in its process group?
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("sim explore's workers outlived it")
        # (Only directories whose process is gone: a simulation running elsewhere on the
        # machine meanwhile has a live one.)
        left = [d for d in set(_sim_root().glob("txrpc-sim-*")) - before if not _made_by_a_live_process(d)]
        assert not left, f"the stopped runs left their data behind: {sorted(left)}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _made_by_a_live_process(directory: Path) -> bool:
    from txrpc.testing._sim import _SIM_DIR, _pid_alive

    match = _SIM_DIR.fullmatch(directory.name)
    return match is not None and _pid_alive(int(match[2]))


def test_stale_simulation_directories_are_swept_but_not_live_ones(tmp_path: Path) -> None:
    """A run killed by SIGTERM/SIGKILL never reaches ``simulate``'s ``finally``: its
    directory goes at the next sweep, unless its process still runs."""
    from txrpc.testing._sim import sweep_stale_sim_dirs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its PID is dead
    stale = tmp_path / f"txrpc-sim-7-p{gone.pid}-abcd1234"
    live = tmp_path / f"txrpc-sim--7-p{os.getpid()}-abcd1234"
    other = tmp_path / "txrpc-sim-7-abcd1234"  # no PID in the name: not ours to judge
    bogus = tmp_path / "txrpc-sim-7-p99999999999-abcd1234"  # not a PID: kept, and no error
    for directory in (stale, live, other, bogus):
        (directory / "s0").mkdir(parents=True)
    assert sweep_stale_sim_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists() and bogus.exists()
