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
