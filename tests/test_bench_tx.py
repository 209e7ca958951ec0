"""`txrpc bench tx`'s ratios: paired per round, rounds in alternating order."""

from __future__ import annotations

from txrpc._bench_tx import CROSS, ONE, Row, round_orders, round_ratios, summarize_ratios


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
    """PostgreSQL's limits are checked before the peer runs: each client needs a
    connection per database (the default max_connections, 100, does not fit 64 clients:
    it failed with a traceback from psycopg) and two prepared transactions; the bench
    says which limit is short and --pg-setup raises only that."""
    from txrpc._bench_tx import pg_connections_needed, pg_settings_for, pg_shortfall

    server = {"max_prepared_transactions": 200, "max_connections": 100, "superuser_reserved_connections": 3}
    server["in_use"] = 1  # only the check's own connection
    assert pg_connections_needed(32) == 97
    assert pg_shortfall(server, 32) == ""  # 100 - 3 reserved = 97 free
    short = pg_shortfall(server, 33)
    assert "33 clients need 100 PostgreSQL connections" in short and "leaves 97 free" in short
    assert pg_settings_for(server, 64) == {"max_connections": 3 + 1 + 193 + 20}
    busy = {**server, "in_use": 11}  # ten other sessions hold connections
    assert pg_shortfall(busy, 32) != "" and pg_settings_for(busy, 32) == {"max_connections": 3 + 11 + 97 + 20}
    off = {**server, "max_prepared_transactions": 0}
    assert "max_prepared_transactions = 0" in pg_shortfall(off, 8)
    assert pg_settings_for(off, 8) == {"max_prepared_transactions": 200}
    few = {**server, "max_prepared_transactions": 10, "max_connections": 1000}
    assert "below the 16 transactions" in pg_shortfall(few, 8)
    assert pg_settings_for(few, 150) == {"max_prepared_transactions": 300}
