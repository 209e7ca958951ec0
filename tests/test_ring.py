"""Placement properties of txrpc.HashRing, the rebalance plan, `txrpc ring` and `txrpc bench ring`."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from txrpc._bench_ring import ring as bench_ring_command
from txrpc._bench_ring import run_ring_bench
from txrpc._ring import (
    PARTITIONS_DEFAULT,
    HashRing,
    Key,
    RebalancePlan,
    RingNode,
    key_hash,
    load_bound,
    partition_hash_range,
    partition_of,
    rendezvous_score,
)
from txrpc._ring_cli import ring as ring_command

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"
SMALL_PARTITIONS = 512  # property tests: enough partitions to exercise placement, cheap to build

node_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)
zones = st.sampled_from(["z1", "z2", "z3"])


@st.composite
def rings(draw: st.DrawFn, min_nodes: int = 1, max_nodes: int = 10, zoned: bool | None = None) -> HashRing:
    """A small ring: distinct names, optional weights and zones."""
    names = draw(st.lists(node_names, min_size=min_nodes, max_size=max_nodes, unique=True))
    use_zones = draw(st.booleans()) if zoned is None else zoned
    nodes = [
        RingNode(
            name,
            draw(st.sampled_from([1.0, 1.0, 2.0, 0.5, 3.0])),
            draw(zones) if use_zones else None,
        )
        for name in names
    ]
    return HashRing(nodes, partitions=SMALL_PARTITIONS)


def fresh_name(ring: HashRing, seed: int) -> str:
    name = f"new-{seed}"
    while name in ring:
        name += "x"
    return name


# --- the hash -------------------------------------------------------------------------


def test_key_hash_is_xxh3_of_utf8() -> None:
    assert key_hash("alice") == xxhash.xxh3_64_intdigest(b"alice")
    assert key_hash("é") == key_hash("é".encode()) == key_hash(bytearray("é".encode()))
    assert key_hash(memoryview(b"bob")) == key_hash(b"bob")


def test_key_types_are_checked() -> None:
    ring = HashRing(["a", "b"], partitions=64)
    for bad in (42, 1.5, None, ("a",)):
        with pytest.raises(TypeError):
            ring.lookup(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ring.preference_list(bad, 1)  # type: ignore[arg-type]


def test_placement_is_pinned() -> None:
    """Golden values: a change here re-homes every key of every deployed cluster."""
    ring = HashRing([RingNode("a"), RingNode("b", 2.0), RingNode("c", zone="z")], partitions=64)
    assert [ring.lookup(key) for key in ("alice", "bob", "carol", "dave", b"\x00")] == GOLDEN_LOOKUPS
    assert ring.preference_list("alice", 3) == GOLDEN_ALICE_3
    assert ring.digest(2) == GOLDEN_DIGEST_2


GOLDEN_LOOKUPS = ["a", "b", "b", "a", "c"]
GOLDEN_ALICE_3 = ("a", "c", "b")
GOLDEN_DIGEST_2 = "c07e154b3b114ecdbbfb3a6d3fc16eae"


@settings(max_examples=30, deadline=None)
@given(ring=rings(zoned=False))
def test_tables_follow_the_specified_scores(ring: HashRing) -> None:
    """The bulk table build agrees with the one-score-at-a-time rule of specs/sharding.md."""
    n = min(3, len(ring))
    for partition in range(0, ring.partitions, 37):
        ranked = sorted(
            ring.nodes, key=lambda node: (-rendezvous_score(node.name, node.weight, partition), node.name)
        )
        assert ring.replicas_of_partition(partition, n) == tuple(node.name for node in ranked[:n])


def test_partition_of_uses_top_bits() -> None:
    for key in ("alice", "bob", b"x"):
        h = key_hash(key)
        assert partition_of(key, 1024) == h >> 54
        start, end = partition_hash_range(partition_of(key, 1024), 1024)
        assert start <= h < end
    assert partition_hash_range(1023, 1024)[1] == 2**64
    with pytest.raises(ValueError):
        partition_of("k", 1000)


PLACEMENT_SCRIPT = textwrap.dedent(
    """
    from txrpc._ring import HashRing, RingNode
    nodes = [RingNode(f"node-{i}", 1 + i % 3, f"zone-{i % 2}") for i in range(7)]
    ring = HashRing(reversed(nodes), partitions=4096)
    keys = [f"key-{i}" for i in range(2000)]
    print(ring.digest(1), ring.digest(3), ring.lookup_many(keys))
    print([ring.preference_list(k, 3) for k in keys[:200]])
    """
)


def test_placement_is_identical_across_pythonhashseed() -> None:
    outputs = set()
    for seed in ("0", "1", "4242", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", PLACEMENT_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


# --- placement properties (Hypothesis) --------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(ring=rings(), seed=st.integers(0, 1000), weight=st.sampled_from([1.0, 0.5, 2.0]), zone=zones)
def test_adding_a_node_moves_keys_only_to_it(ring: HashRing, seed: int, weight: float, zone: str) -> None:
    name = fresh_name(ring, seed)
    grown = ring.with_node(name, weight=weight, zone=zone)
    for before, after in zip(ring.owners(), grown.owners(), strict=True):
        assert after in (before, name)
    keys = [f"k{seed}-{i}" for i in range(200)]
    for key, before, after in zip(keys, ring.lookup_many(keys), grown.lookup_many(keys), strict=True):
        assert after in (before, name), key


@settings(max_examples=60, deadline=None)
@given(ring=rings(min_nodes=2), data=st.data())
def test_removing_a_node_moves_only_its_keys(ring: HashRing, data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(ring.node_names))
    shrunk = ring.without_node(gone)
    for before, after in zip(ring.owners(), shrunk.owners(), strict=True):
        if before != gone:
            assert after == before


@settings(max_examples=60, deadline=None)
@given(ring=rings(), data=st.data())
def test_replica_lists_never_repeat_a_node(ring: HashRing, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, len(ring)))
    zone_count = len({node.zone if node.zone is not None else ("own", node.name) for node in ring})
    for partition, members in enumerate(ring.replica_table(n)):
        assert len(members) == n == len(set(members))
        assert members[0] == ring.owner_of_partition(partition)
        zones_used = {ring.node(name).zone or ("own", name) for name in members}
        assert len(zones_used) == min(n, zone_count)  # spread over as many zones as possible
    for key in [f"key-{i}" for i in range(50)]:
        assert ring.preference_list(key, n)[0] == ring.lookup(key)


@settings(max_examples=60, deadline=None)
@given(ring=rings(), seed=st.integers(0, 1000), zone=zones, data=st.data())
def test_one_join_changes_a_replica_set_by_at_most_one_member(
    ring: HashRing, seed: int, zone: str, data: st.DataObject
) -> None:
    n = data.draw(st.integers(1, len(ring)))
    grown = ring.with_node(fresh_name(ring, seed), zone=zone)
    for before, after in zip(ring.replica_table(n), grown.replica_table(n), strict=True):
        assert len(set(after) - set(before)) <= 1
    # Leaving is the same change read backwards.
    for before, after in zip(grown.replica_table(n), ring.replica_table(n), strict=True):
        assert len(set(after) - set(before)) <= 1


@settings(max_examples=30, deadline=None)
@given(ring=rings(), data=st.data())
def test_node_order_does_not_matter(ring: HashRing, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(ring.nodes))
    other = HashRing(shuffled, partitions=ring.partitions)
    assert other == ring
    assert other.digest(1) == ring.digest(1)
    assert other.digest(min(3, len(ring))) == ring.digest(min(3, len(ring)))


@settings(max_examples=40, deadline=None)
@given(names=st.lists(node_names, min_size=2, max_size=16, unique=True))
def test_load_is_within_the_documented_bound(names: list[str]) -> None:
    ring = HashRing(names, partitions=4096)
    assert ring.load_ratio() <= ring.load_bound() == load_bound(1 / len(names), 4096)


@settings(max_examples=8, deadline=None)
@given(names=st.lists(node_names, min_size=10, max_size=10, unique=True))
def test_default_settings_keep_ten_nodes_within_ten_percent(names: list[str]) -> None:
    ring = HashRing(names)
    assert ring.partitions == PARTITIONS_DEFAULT
    assert ring.load_bound() <= 1.10
    assert ring.load_ratio() <= ring.load_bound()


@settings(max_examples=30, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=8),
    prefix=node_names,
)
def test_weights_are_respected(weights: list[float], prefix: str) -> None:
    partitions = 8192
    nodes = [RingNode(f"{prefix}-{i}", weight) for i, weight in enumerate(weights)]
    ring = HashRing(nodes, partitions=partitions)
    counts = ring.partition_counts()
    for name, share in ring.target_shares().items():
        sigma = math.sqrt(partitions * share * (1 - share))
        assert abs(counts[name] - partitions * share) <= 6 * sigma + 1, (name, share, counts[name])


# --- rebalance plans ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(ring=rings(min_nodes=2, zoned=False), seed=st.integers(0, 1000), data=st.data())
def test_plan_lists_exactly_the_changed_partitions(ring: HashRing, seed: int, data: st.DataObject) -> None:
    replicas = data.draw(st.integers(1, len(ring)))
    name = fresh_name(ring, seed)
    grown = ring.with_node(name)
    plan = RebalancePlan.between(ring, grown, replicas)
    before, after = ring.replica_table(replicas), grown.replica_table(replicas)
    changed = {p for p in range(ring.partitions) if before[p] != after[p]}
    listed = {p for move in plan.moves for p in range(move.first_partition, move.last_partition + 1)}
    assert listed == changed
    assert plan.nodes_added == (name,) and plan.nodes_removed == ()
    assert all(target == name for _, target in plan.transfers())
    assert all(new == name for _, new in plan.primary_transfers())
    assert plan.fraction_moved == sum(1 for owner in grown.owners() if owner == name) / ring.partitions
    assert plan.copies == sum(1 for members in after if name in members)
    assert math.isclose(plan.fraction_optimal, grown.target_shares()[name])
    for move in plan.moves:
        assert move.hash_start == partition_hash_range(move.first_partition, ring.partitions)[0]
        assert move.hash_end == partition_hash_range(move.last_partition, ring.partitions)[1]
        assert move.source in move.before and move.gained == (name,)


def test_ten_to_eleven_nodes_moves_near_the_optimum() -> None:
    ring = HashRing([f"node-{i}" for i in range(10)])
    plan = ring.plan_to(ring.with_node("node-10"), replicas=3)
    assert math.isclose(plan.fraction_optimal, 1 / 11)
    assert plan.ratio_to_optimal <= 1.05
    assert plan.copies_fraction <= 1.05 / 11
    assert set(plan.primary_transfers()) <= {(f"node-{i}", "node-10") for i in range(10)}


def test_plan_between_rings_of_different_partitions_is_refused() -> None:
    with pytest.raises(ValueError, match="partition counts"):
        RebalancePlan.between(HashRing(["a"], partitions=64), HashRing(["a", "b"], partitions=128))


# --- API edges ------------------------------------------------------------------------


def test_ring_api_edges() -> None:
    ring = HashRing(["b", "a", "c"], weights={"a": 2}, zones={"c": "z"}, partitions=256)
    assert ring.node_names == ("a", "b", "c")
    assert ring.node("a").weight == 2.0 and ring.node("c").zone == "z"
    assert "a" in ring and "x" not in ring and len(ring) == 3
    assert math.isclose(sum(ring.shares().values()), 1.0)
    assert sum(ring.partition_counts().values()) == 256
    keys: list[Key] = [f"k{i}" for i in range(100)]
    keys += [b"raw", bytearray(b"ba"), memoryview(b"mv")]
    assert ring.lookup_many(keys) == [ring.lookup(k) for k in keys]
    for bad_n in (0, 4, -1):
        with pytest.raises(ValueError):
            ring.preference_list("k", bad_n)
    with pytest.raises(ValueError, match="already"):
        ring.with_node("a")
    with pytest.raises(ValueError, match="not in the ring"):
        ring.without_node("x")
    with pytest.raises(ValueError, match="last node"):
        HashRing(["a"], partitions=64).without_node("a")
    with pytest.raises(ValueError, match="at least one"):
        HashRing([], partitions=64)
    with pytest.raises(ValueError, match="twice"):
        HashRing(["a", "a"], partitions=64)
    with pytest.raises(ValueError, match="not in the ring"):
        HashRing(["a"], weights={"b": 2}, partitions=64)
    with pytest.raises(ValueError, match="power of two"):
        HashRing(["a"], partitions=100)
    for weight in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="weight"):
            RingNode("a", weight)
    with pytest.raises(TypeError):
        HashRing("abc", partitions=64)


def test_single_partition_ring_works() -> None:
    ring = HashRing(["a", "b"], partitions=1)
    assert ring.lookup("x") == ring.lookup("y") == ring.owner_of_partition(0)


# --- CLI ------------------------------------------------------------------------------


def test_ring_show_prints_every_node() -> None:
    result = CliRunner().invoke(ring_command, ["show", "--config", str(EXAMPLE_CONFIG)])
    assert result.exit_code == 0, result.output
    for text in ("epoch 1", "3 nodes", "127.0.0.1:7401", "zone-3", "documented bound"):
        assert text in result.output


def test_ring_plan_add_and_remove(tmp_path: Path) -> None:
    result = CliRunner().invoke(ring_command, ["plan", "--config", str(EXAMPLE_CONFIG), "--add", "d"])
    assert result.exit_code == 0, result.output
    assert "25.00%" in result.output and "primaries move only to added nodes: yes" in result.output
    config = tmp_path / "cluster.toml"
    config.write_text(EXAMPLE_CONFIG.read_text().replace("replication_factor = 3", "replication_factor = 2"))
    result = CliRunner().invoke(
        ring_command, ["plan", "--config", str(config), "--remove", "c", "--ranges", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "primaries move only off removed nodes: yes" in result.output
    result = CliRunner().invoke(ring_command, ["plan", "--config", str(EXAMPLE_CONFIG), "--remove", "c"])
    assert result.exit_code != 0 and "replication factor 3 needs 3 nodes" in result.output
    result = CliRunner().invoke(ring_command, ["plan", "--config", str(EXAMPLE_CONFIG)])
    assert result.exit_code == 2 and "--add" in result.output
    result = CliRunner().invoke(ring_command, ["plan", "--config", str(EXAMPLE_CONFIG), "--add", "a"])
    assert result.exit_code == 2 and "already" in result.output


def test_ring_show_reports_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(EXAMPLE_CONFIG.read_text().replace("port = 7402", "port = 99999"))
    result = CliRunner().invoke(ring_command, ["show", "--config", str(config)])
    assert result.exit_code == 1
    assert "nodes[1].port" in result.output


def test_bench_runs_small() -> None:
    rows = run_ring_bench(keys=3000, nodes=4, replicas=2, partitions=1024, rounds=1, seed=7)
    by_metric = {row.metric: row for row in rows}
    assert by_metric["moved keys on the new node"].met is True
    assert all(row.ours > 0 for row in rows)
    result = CliRunner().invoke(
        bench_ring_command, ["--keys", "2000", "--nodes", "3", "--partitions", "256", "--rounds", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "lookup(key)" in result.output and "uhashring" in result.output
