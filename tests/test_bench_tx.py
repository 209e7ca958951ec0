"""`txrpc bench tx`'s ratios (paired per round, rounds in alternating order) and its CPU
time per transfer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from txrpc._bench_tx import (
    CROSS,
    ONE,
    CpuMeter,
    Row,
    _median_or_none,
    _median_split,
    cpu_split_line,
    parent_pid,
    process_cpu_s,
    round_orders,
    round_ratios,
    server_pids,
    summarize_ratios,
)


def rows(r1: float, r1_one: float, r3: float, pg: float) -> list[Row]:
    return [
        Row("txrpc R=1", CROSS, 32, r1, 1, 2, 0, True),
        Row("txrpc R=1", ONE, 32, r1_one, 1, 2, 0, True),
        Row("txrpc R=3", CROSS, 32, r3, 1, 2, 0, True),
        Row("PG 2PC", CROSS, 32, pg, 1, 2, 0, True),
    ]


def test_rounds_alternate_their_order_so_drift_favours_no_stack() -> None:
    assert round_orders([1, 3], True, 3) == [[1, 3, "pg"], ["pg", 3, 1], [1, 3, "pg"]]
    assert round_orders([1], False, 2) == [[1], [1]]


def test_each_rounds_ratios_compare_that_rounds_runs_only() -> None:
    found = round_ratios(rows(r1=900, r1_one=2000, r3=450, pg=1000))
    assert found == {
        "r1_vs_pg": 0.9,
        "r1_one_vs_cross": 2000 / 900,
        "r3_vs_pg": 0.45,
        "r3_vs_r1": 0.5,
    }
    assert "r1_vs_pg" not in round_ratios(rows(900, 2000, 450, 1000)[:3])  # no PostgreSQL: no ratio to it


def test_the_summary_is_the_median_of_paired_ratios_not_a_ratio_of_medians() -> None:
    # txrpc is ahead of PostgreSQL in two rounds of three; taken per side, the medians
    # (1,020 against 1,250 transfers/s) would compare round 2's txrpc with round 3's
    # PostgreSQL and say 0.82x.
    per_round = [
        round_ratios(rows(r1=600, r1_one=1300, r3=290, pg=590)),
        round_ratios(rows(r1=1020, r1_one=2100, r3=520, pg=1500)),
        round_ratios(rows(r1=1300, r1_one=2500, r3=640, pg=1250)),
    ]
    summary = summarize_ratios(per_round)
    r1 = summary["r1_vs_pg"]
    assert r1.rounds == 3 and r1.met
    assert (r1.low, r1.median, r1.high) == (1020 / 1500, 600 / 590, 1300 / 1250)
    assert r1.shown == "1.02× PG (0.68–1.04)" and r1.goal == "≥1× PG"
    one = summary["r1_one_vs_cross"]  # 2.17, 2.06, 1.92
    assert one.median == 2100 / 1020 and one.met and one.shown == "2.06× x-shard (1.92–2.17)"
    assert summary["r3_vs_r1"].median == 640 / 1300 and not summary["r3_vs_r1"].met  # 0.48, 0.51, 0.49
    assert not summary["r3_vs_pg"].met
    assert summarize_ratios([]) == {}


def test_a_replicated_single_shard_ratio_has_no_target() -> None:
    """Issue 5's 2x is for one-phase single-shard commits (R = 1); at R = 3 they go
    through the coordinator, so the ratio is shown without a target."""
    found = round_ratios(
        [Row("txrpc R=3", CROSS, 32, 500, 1, 2, 0, True), Row("txrpc R=3", ONE, 32, 600, 1, 2, 0, True)]
    )
    ratio = summarize_ratios([found])["r3_one_vs_cross"]
    assert ratio.target is None and ratio.goal == "" and ratio.shown == "1.20× x-shard"


def test_the_peer_is_refused_with_what_is_short_before_it_starts() -> None:
    """PostgreSQL's limits are checked before the peer runs: each client holds a
    connection per database (the default max_connections, 100, does not fit 64 clients:
    that failed with a traceback from psycopg) and up to two prepared transactions; the
    bench says which limits are short, and --pg-setup raises only those."""
    from txrpc._bench_tx import pg_shortages

    server = {"max_prepared_transactions": 200, "max_connections": 100, "superuser_reserved_connections": 3}
    server |= {"superuser": 1, "in_use": 1}  # only the check's own connection, as a superuser
    assert pg_shortages(server, 33) == {}  # 99 of 100: a superuser may take the reserved ones
    ((value, why),) = pg_shortages(server, 34).values()
    assert value == 100 + 2 + 20 and "34 clients need 102 connections" in why and "leaves 100 free" in why
    role = {**server, "superuser": 0}  # not a superuser: the reserved connections are not its
    assert pg_shortages(role, 32) == {} and list(pg_shortages(role, 33)) == ["max_connections"]
    busy = {**server, "in_use": 11}  # ten other sessions hold connections
    assert pg_shortages(busy, 30) == {} and pg_shortages(busy, 31)["max_connections"][0] == 100 + 3 + 20
    off = {**server, "max_prepared_transactions": 0}
    ((value, why),) = pg_shortages(off, 8).values()
    assert value == 200 and "max_prepared_transactions = 0" in why
    few = {**server, "max_prepared_transactions": 10}
    assert "below the 16 transactions" in pg_shortages(few, 8)["max_prepared_transactions"][1]
    both = pg_shortages(few, 150)
    assert both["max_prepared_transactions"][0] == 300 and both["max_connections"][0] == 100 + 350 + 20


# --- CPU time per transfer (Linux /proc) -------------------------------------------------

needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")

SPIN = "import time\nwhile time.process_time() < {s}: pass\n"
THEN_WAIT = "import sys; print('spun', flush=True); sys.stdin.read()"


def _spinner(cpu_s: float, then: str = THEN_WAIT) -> subprocess.Popen[str]:
    """A child that burns ``cpu_s`` of CPU, says so, then waits (for its stdin to close)."""
    code = SPIN.format(s=cpu_s) + then
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@needs_proc
def test_a_process_cpu_time_is_read_from_proc() -> None:
    child = _spinner(0.4)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        used = process_cpu_s(child.pid)
        assert used is not None and 0.35 <= used < 5
        assert process_cpu_s(2**22 + 12345) is None  # a process that is gone: no reading
    finally:
        child.communicate()


@needs_proc
def test_reaped_children_count_only_when_asked() -> None:
    """A PostgreSQL backend that exits during the measurement lives on in the postmaster's
    reaped-children time: a parent that ran and waited for a spinning child shows it."""
    inner = SPIN.format(s=0.4)
    child = _spinner(0.0, f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {inner!r}])\n"
                          "print('spun', flush=True); sys.stdin.read()")  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        own, with_reaped = process_cpu_s(child.pid), process_cpu_s(child.pid, reaped=True)
        assert own is not None and with_reaped is not None
        assert with_reaped - own >= 0.35 and own < 0.35
    finally:
        child.communicate()


@needs_proc
def test_the_meter_counts_processes_that_start_during_the_measurement_from_zero() -> None:
    pids: list[int] = []
    meter = CpuMeter(lambda: pids)
    meter.start()
    child = _spinner(0.4)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        pids.append(child.pid)  # not there at the start: all of its time counts
        per = meter.per(100)
        assert per is not None and 3.5 <= per < 50  # >= 0.35 s over 100 transfers, in ms
        assert meter.per(0) is None  # nothing committed: no figure
    finally:
        child.communicate()


@needs_proc
def test_a_process_that_exits_during_the_measurement_voids_the_figure_unless_its_parent_reaps_it() -> None:
    """Its time since the start is not known any more: no figure (rather than one too
    low). The peer's meter counts reaped children: a backend that exits is in the
    postmaster's time, which the meter reads."""
    child = _spinner(0.0)
    assert child.stdout is not None and child.stdout.readline().strip() == "spun"
    meter = CpuMeter(lambda: [child.pid])
    meter.start()
    child.communicate()  # exits (and is reaped)
    assert meter.per(10) is None

    inner = SPIN.format(s=0.4)
    run_spinner = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {inner!r}]);"
    parent = _spinner(0.0, THEN_WAIT.replace("import sys;", run_spinner))
    try:
        assert parent.stdout is not None
        reaped = CpuMeter(lambda: [parent.pid], reaped=True)
        reaped.start()  # (the grandchild is spinning or done: its time lands in the parent's once reaped)
        assert parent.stdout.readline().strip() == "spun"
        per = reaped.per(100)
        assert per is not None and per >= 3.5  # the grandchild's 0.4 s over 100 transfers, in ms
    finally:
        parent.communicate()


@needs_proc
def test_the_servers_processes_are_the_postmaster_and_its_children() -> None:
    """The peer's processes are found from the bench's own backend: its parent (the
    postmaster) and the postmaster's children. A server not on this machine: none (n/a)."""
    child = _spinner(0.0)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        assert parent_pid(child.pid) == os.getpid()
        assert server_pids(os.getpid())[0] == os.getpid() and child.pid in server_pids(os.getpid())
        assert parent_pid(2**22 + 12345) is None and server_pids(None) == []
    finally:
        child.communicate()
    meter = CpuMeter(lambda: [os.getpid()], complete=False)  # some of the stack cannot be seen
    meter.start()
    assert meter.per(10) is None


def test_rows_without_a_cpu_figure_are_shown_without_one() -> None:
    assert _median_or_none([None, None]) is None
    assert _median_or_none([1.0, None, 3.0]) == 2.0


@needs_proc
def test_the_figure_splits_by_process_name_the_rest_together() -> None:
    """``--cpu-detail``: which process of the stack spends the CPU (the peer: its clients
    against its server's processes, unnamed, together)."""
    spinners = [_spinner(0.3), _spinner(0.3)]
    try:
        named, unnamed = spinners
        meter = CpuMeter(lambda: [named.pid, unnamed.pid], names={named.pid: "node a"}, others="server")
        meter.start()  # (they spin from before the start on: what counts is the time since)
        for child in spinners:
            assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        total = meter.per(100)
        split = meter.by_process
        assert total is not None and split is not None and set(split) == {"node a", "server"}
        assert sum(split.values()) == pytest.approx(total)
    finally:
        for child in spinners:
            child.communicate()
    empty = CpuMeter(lambda: [])
    empty.start()
    assert empty.per(10) is None and empty.by_process is None  # no figure: no split


def test_the_split_is_each_processs_median_over_the_rounds_clients_first() -> None:
    rounds = [
        {"node b": 0.3, "clients": 0.2, "coordinator": 0.1},
        {"node b": 0.5, "clients": 0.4, "coordinator": 0.3},
        None,  # a round without a figure
        {"node b": 0.4, "clients": 0.3, "coordinator": 0.2, "node a": 0.9},
    ]
    split = _median_split(rounds)
    assert split is not None
    assert list(split) == ["clients", "coordinator", "node a", "node b"]
    assert split == pytest.approx({"clients": 0.3, "coordinator": 0.2, "node a": 0.9, "node b": 0.4})
    assert _median_split([None, None]) is None
    row = Row("PG 2PC", CROSS, 32, 1000, 1, 2, 0, True, 1.2, {"clients": 0.6, "server": 0.6})
    assert cpu_split_line(row) == "PG 2PC, cross-shard (2 of 3): clients 0.60, server 0.60"
    assert cpu_split_line(Row("PG 2PC", CROSS, 32, 1000, 1, 2, 0, True)) is None
