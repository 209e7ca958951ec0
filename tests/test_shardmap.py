"""ShardMap: cluster.toml loading, validation errors that name the field, the CBOR wire form."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txrpc._codec import decode_value, encode_value
from txrpc._ring import PLACEMENT_VERSION, HashRing, Key
from txrpc._shardmap import (
    ClusterConfig,
    ConfigError,
    NodeSpec,
    ShardMap,
    load_cluster_config,
)

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"

BASE = """
[cluster]
epoch = 4
replication_factor = 2
partitions = 256

[coordinator]
host = "127.0.0.1"
port = 7500

[[nodes]]
name = "a"
host = "127.0.0.1"
port = 7501

[[nodes]]
name = "b"
host = "localhost"
port = 7502
zone = "z2"
weight = 2

[[nodes]]
name = "c"
host = "::1"
port = 7503
"""


def parse(text: str) -> ClusterConfig:
    return ClusterConfig.from_toml(text, source="test.toml", base_dir=Path("/srv/cluster"))


def small_nodes(count: int) -> list[NodeSpec]:
    return [NodeSpec(f"n{i}", "127.0.0.1", 8000 + i) for i in range(count)]


# --- loading --------------------------------------------------------------------------


def test_example_config_loads() -> None:
    config = load_cluster_config(EXAMPLE_CONFIG)
    shard_map = config.shard_map
    assert shard_map.epoch == 1 and shard_map.replication_factor == 3 and len(shard_map.nodes) == 3
    assert [node.port for node in shard_map.nodes] == [7401, 7402, 7403]
    assert all(node.host == "127.0.0.1" for node in shard_map.nodes)
    assert config.coordinator is not None and config.coordinator.port == 7400
    assert config.coordinator.data_dir == EXAMPLE_CONFIG.parent / "data" / "coordinator"
    assert config.data_dir_for("a") == EXAMPLE_CONFIG.parent / "data" / "a"
    assert shard_map == ShardMap.load(EXAMPLE_CONFIG)
    # Every partition is on every node, primary spread evenly.
    assert set(shard_map.replica_counts().values()) == {shard_map.partitions}


def test_config_fields_are_read() -> None:
    config = parse(BASE)
    shard_map = config.shard_map
    assert (shard_map.epoch, shard_map.replication_factor, shard_map.partitions) == (4, 2, 256)
    b = shard_map.node("b")
    assert (b.host, b.port, b.zone, b.weight) == ("localhost", 7502, "z2", 2.0)
    assert shard_map.node("c").host == "::1"
    assert config.data_dir == Path("/srv/cluster/data")
    assert config.data_dir_for("b") == Path("/srv/cluster/data/b")
    with pytest.raises(KeyError):
        config.data_dir_for("zz")
    ring = HashRing(
        ["a", "b", "c"], weights={"b": 2}, zones={"b": "z2"}, partitions=256
    )  # the map's placement is the ring's
    assert list(shard_map.replica_sets) == ring.replica_table(2)
    assert shard_map.ring() == ring


def test_defaults_and_overrides() -> None:
    text = BASE.replace("epoch = 4\n", "").replace(
        "partitions = 256\n", "partitions = 64\ndata_dir = 'var'\n"
    )
    text = text.replace("port = 7501\n", 'port = 7501\ndata_dir = "/disk/a"\n')
    config = parse(text)
    assert config.shard_map.epoch == 1
    assert config.data_dir_for("a") == Path("/disk/a")
    assert config.data_dir_for("b") == Path("/srv/cluster/var/b")


BAD_CONFIGS = [
    # (replace this, with that, the field named, a phrase of the message)
    ("[cluster]", "[storage]\nurl = 'x'\n[cluster]", "storage", "unknown field"),
    ("partitions = 256", "partitions = 256\nvnodes = 160", "cluster.vnodes", "fixed partitions"),
    ("port = 7501", "port = 7501\nhots = 'x'", "nodes[0].hots", "did you mean 'host'"),
    ("port = 7500", "port = 7500\nbind = 1", "coordinator.bind", "unknown field"),
    ('name = "b"', 'name = "a"', "nodes[1].name", "duplicate node 'a'"),
    (
        'host = "localhost"\nport = 7502',
        'host = "127.0.0.1"\nport = 7501',
        "nodes[1].port",
        "also the address",
    ),
    (
        "replication_factor = 2",
        "replication_factor = 4",
        "cluster.replication_factor",
        "larger than the node count",
    ),
    ("replication_factor = 2", "replication_factor = 0", "cluster.replication_factor", "integer >= 1"),
    ('host = "localhost"', 'host = "localhost:7502"', "nodes[1].host", "put the port in the 'port' field"),
    ('host = "localhost"', 'host = "local host"', "nodes[1].host", "not a host name or IP address"),
    ('host = "localhost"', 'host = "-bad-.example"', "nodes[1].host", "not a host name or IP address"),
    ('host = "localhost"', "host = 127", "nodes[1].host", "non-empty string"),
    ("port = 7502", "port = 70000", "nodes[1].port", "1..65535"),
    ("port = 7502", 'port = "7502"', "nodes[1].port", "1..65535"),
    ("port = 7502", "port = true", "nodes[1].port", "1..65535"),
    ('host = "localhost"\n', "", "nodes[1].host", "required"),
    ('name = "c"', 'name = "c d"', "nodes[2].name", "not a node name"),
    ("weight = 2", "weight = -1", "nodes[1].weight", "> 0"),
    ("weight = 2", "weight = true", "nodes[1].weight", "> 0"),
    ("weight = 2", "weight = nan", "nodes[1].weight", "> 0"),
    ('zone = "z2"', "zone = ''", "nodes[1].zone", "non-empty string"),
    ("partitions = 256", "partitions = 1000", "cluster.partitions", "power of two"),
    ("epoch = 4", "epoch = 0", "cluster.epoch", "1.."),
    ("port = 7500", "port = 7501", "coordinator.port", "also the address of node 'a'"),
    ('[coordinator]\nhost = "127.0.0.1"\n', "[coordinator]\n", "coordinator.host", "required"),
]


@pytest.mark.parametrize(("old", "new", "field", "phrase"), BAD_CONFIGS)
def test_bad_config_names_the_field(old: str, new: str, field: str, phrase: str) -> None:
    assert old in BASE
    with pytest.raises(ConfigError) as caught:
        parse(BASE.replace(old, new, 1))
    error = caught.value
    assert error.field == field
    assert phrase in str(error)
    assert str(error).startswith(f"test.toml: {field}: ")


@pytest.mark.parametrize(
    ("text", "field", "phrase"),
    [
        ("[[nodes]]\nname='a'\nhost='h'\nport=1\n", "cluster", "required"),
        ("[cluster]\nreplication_factor = 1\n", "nodes", "required"),
        ("nodes = []\n[cluster]\nreplication_factor = 1\n", "nodes", "one or more"),
        ("nodes = 3\n[cluster]\nreplication_factor = 1\n", "nodes", "one or more"),
        ("[cluster]\nreplication_factor = 1\nnodes = 3\n", "nodes", "required"),
        ("cluster = 1\n[[nodes]]\nname='a'\nhost='h'\nport=1\n", "cluster", "must be a table"),
        ("[cluster\n", None, "not valid TOML"),
    ],
)
def test_bad_config_shapes(text: str, field: str | None, phrase: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert caught.value.field == field
    assert phrase in str(caught.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as caught:
        load_cluster_config(tmp_path / "bad.toml")
    assert caught.value.source == str(tmp_path / "bad.toml")


# --- the map --------------------------------------------------------------------------


def test_routing_helpers_agree() -> None:
    shard_map = ShardMap.build(small_nodes(5), replication_factor=3, partitions=128, epoch=9)
    ring = shard_map.ring()
    keys: list[Key] = ["alice", "bob", b"\x01\x02", "ünïcode"]
    for key in keys:
        route = shard_map.route(key)
        assert route.epoch == 9
        assert route.partition == shard_map.partition_of(key) == ring.partition_of(key)
        assert route.replicas == shard_map.replicas_of(key) == ring.preference_list(key, 3)
        assert route.primary == shard_map.primary_of(key) == shard_map.node(ring.lookup(key))
    assert sum(shard_map.partition_counts().values()) == 128
    assert sum(shard_map.replica_counts().values()) == 128 * 3


def test_map_invariants_are_checked() -> None:
    nodes = small_nodes(3)
    good = ShardMap.build(nodes, replication_factor=2, partitions=64)
    sets = list(good.replica_sets)
    with pytest.raises(ConfigError, match="one replica set per partition"):
        ShardMap(1, 2, 64, tuple(nodes), tuple(sets[:-1]))
    for bad_set in [(), ("n0", "n1", "n2", "n3"), ("n0", "n0"), ("n0", "zz")]:
        with pytest.raises(ConfigError, match="partition 5"):
            ShardMap(1, 2, 64, tuple(nodes), (*sets[:5], bad_set, *sets[6:]))
    # A set may be smaller than the replication factor: a replica was marked down.
    shrunk = ShardMap(1, 2, 64, tuple(nodes), (*sets[:5], ("n0",), *sets[6:]))
    assert shrunk.replica_sets[5] == ("n0",)

    with pytest.raises(ConfigError) as caught:
        ShardMap(0, 2, 64, tuple(nodes), tuple(sets))
    assert caught.value.field == "epoch"
    with pytest.raises(ConfigError, match="both listen"):
        ShardMap.build([*nodes, NodeSpec("n9", "127.0.0.1", 8000)], replication_factor=1, partitions=64)
    with pytest.raises(ConfigError, match="twice"):
        ShardMap.build([*nodes, nodes[0]], replication_factor=1, partitions=64)
    with pytest.raises(ConfigError) as caught:
        ShardMap.build(nodes, replication_factor=4, partitions=64)
    assert caught.value.field == "replication_factor"
    with pytest.raises(ConfigError) as caught:
        NodeSpec("a", "not a host", 1)
    assert caught.value.field == "host" and "node 'a'" in str(caught.value)



def test_mark_down_and_promote_make_the_next_epoch() -> None:
    nodes = small_nodes(3)
    base = ShardMap.build(nodes, replication_factor=3, partitions=64)
    down = base.without_replica("n1")
    assert down.epoch == 2 and all("n1" not in members for members in down.replica_sets)
    # Where n1 was primary, the next replica took over; elsewhere the order is kept.
    for before, after in zip(base.replica_sets, down.replica_sets, strict=True):
        assert after == tuple(m for m in before if m != "n1")
    promoted = base.with_primary("n2")
    assert promoted.epoch == 2 and all(members[0] == "n2" for members in promoted.replica_sets)
    alone = ShardMap.build(nodes, replication_factor=1, partitions=64)
    with pytest.raises(ConfigError, match="last replica"):
        alone.without_replica(alone.replica_sets[0][0])
    assert ShardMap.from_wire(down.to_wire()) == down


def test_new_epochs_and_plans() -> None:
    first = ShardMap.build(small_nodes(4), replication_factor=2, partitions=256)
    grown = first.with_nodes(small_nodes(5))
    assert grown.epoch == 2
    plan = first.plan_to(grown)
    assert plan.nodes_added == ("n4",)
    assert all(target == "n4" for _, target in plan.transfers())
    assert first.with_epoch(7).replica_sets == first.replica_sets
    with pytest.raises(ValueError, match="partition counts"):
        first.plan_to(ShardMap.build(small_nodes(4), replication_factor=2, partitions=128))


# --- the wire -------------------------------------------------------------------------


@st.composite
def shard_maps(draw: st.DrawFn) -> ShardMap:
    count = draw(st.integers(1, 8))
    nodes = [
        NodeSpec(
            f"n{i}",
            draw(st.sampled_from(["127.0.0.1", "db.example", "::1"])),
            9000 + i,
            draw(st.one_of(st.none(), st.sampled_from(["z1", "z2"]))),
            draw(st.sampled_from([1.0, 2.0, 0.25])),
        )
        for i in range(count)
    ]
    return ShardMap.build(
        nodes,
        replication_factor=draw(st.integers(1, count)),
        epoch=draw(st.integers(1, 2**63 - 1)),
        partitions=draw(st.sampled_from([1, 2, 64, 512])),
    )


@settings(max_examples=50, deadline=None)
@given(shard_map=shard_maps())
def test_wire_round_trip(shard_map: ShardMap) -> None:
    assert ShardMap.decode(shard_map.encode()) == shard_map
    assert ShardMap.from_wire(decode_value(encode_value(shard_map.to_wire()))) == shard_map


def test_wire_uses_wider_indexes_when_needed() -> None:
    shard_map = ShardMap.build(
        [NodeSpec(f"n{i:02d}", "127.0.0.1", 9000 + i) for i in range(20)],
        replication_factor=3,
        partitions=2048,
    )
    wire = shard_map.to_wire()
    assert len(wire["sets"]) > 256
    assert len(wire["set_of_partition"]) == 2 * 2048
    assert ShardMap.decode(shard_map.encode()) == shard_map


def _tampered(**changes: object) -> dict[str, object]:
    wire = dict(ShardMap.build(small_nodes(3), replication_factor=2, partitions=64).to_wire())
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("wire", "field"),
    [
        (_tampered(v=2), "v"),
        (_tampered(placement="ring-md5"), "placement"),
        (_tampered(extra=1), "extra"),
        (_tampered(epoch=0), "epoch"),
        (_tampered(partitions=63), "partitions"),
        (_tampered(nodes=[]), "nodes"),
        (_tampered(nodes=[{"name": "n0", "host": "h", "port": 0}]), "nodes[0].port"),
        (
            _tampered(
                nodes=[
                    {"name": "n1", "host": "h", "port": 1},
                    {"name": "n0", "host": "h", "port": 2},
                    {"name": "n2", "host": "h", "port": 3},
                ]
            ),
            "nodes",
        ),
        (_tampered(sets=[[0, 7]]), "sets[0]"),
        (_tampered(sets=[[0, 1]]), "set_of_partition"),
        (_tampered(set_of_partition=b"\x00" * 63), "set_of_partition"),
        (_tampered(set_of_partition=b"\x00" * 64 * 3), "set_of_partition"),
        (_tampered(replication_factor=1, sets=[[0, 1, 2]] * 6), "replica_sets"),  # sets larger than R + 1
        ([1, 2], ""),
    ],
)
def test_bad_wire_maps_are_refused(wire: object, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ShardMap.from_wire(wire)
    assert caught.value.source == "<wire>"
    assert (caught.value.field or "") == field


def test_bad_cbor_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="malformed CBOR"):
        ShardMap.decode(b"\xff\x00")


def test_wire_names_the_placement() -> None:
    assert (
        ShardMap.build(small_nodes(1), replication_factor=1, partitions=1).to_wire()["placement"]
        == PLACEMENT_VERSION
    )


def test_replication_factor_defaults_to_three_or_the_node_count() -> None:
    three = ClusterConfig.from_toml(
        "[cluster]\npartitions = 64\n"
        + "".join(f'[[nodes]]\nname = "n{i}"\nhost = "127.0.0.1"\nport = {7600 + i}\n' for i in range(4)),
        source="t.toml",
    )
    assert three.shard_map.replication_factor == 3
    two = ClusterConfig.from_toml(
        "[cluster]\npartitions = 64\n"
        + "".join(f'[[nodes]]\nname = "n{i}"\nhost = "127.0.0.1"\nport = {7600 + i}\n' for i in range(2)),
        source="t.toml",
    )
    assert two.shard_map.replication_factor == 2
