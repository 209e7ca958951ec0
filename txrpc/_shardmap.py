"""The shard map and the cluster configuration file.

A :class:`ShardMap` says, for one epoch, where every node listens and which replica
set (primary first) holds every partition. It is an immutable value: the shard-map
authority makes a new map with a higher epoch for every change. It is built from the
ring (:meth:`ShardMap.build`), loaded from ``cluster.toml``
(:func:`load_cluster_config`) and sent on the wire as one CBOR-able map
(:meth:`ShardMap.to_wire` / :meth:`ShardMap.from_wire`). Formats are in
``specs/sharding.md``; ``examples/cluster.toml`` is a commented example.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import sys
import tomllib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._codec import FrameError, decode_value, encode_value
from ._ring import (
    HASH_BITS,
    PARTITIONS_DEFAULT,
    PARTITIONS_MAX,
    PLACEMENT_VERSION,
    HashRing,
    Key,
    RebalancePlan,
    RingNode,
    key_hash,
    partition_bits,
)
from ._security import ClusterSecurity

WIRE_FORMAT_VERSION = 1
EPOCH_MAX = 2**63 - 1
NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Node names: 1..64 letters, digits, ``_ . -``, starting with a letter or digit."""
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class ConfigError(ValueError):
    """A cluster configuration or a shard map is invalid.

    ``field`` names the offending field (``"nodes[1].port"``, ``"cluster.replication_factor"``),
    ``source`` the file (or ``"<wire>"``) it came from; ``str()`` carries both.
    """

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None) -> None:
        self.message = message
        self.field = field
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [part for part in (self.source, self.field) if part]
        return ": ".join([*parts, self.message])

    def with_source(self, source: str) -> ConfigError:
        """This error, attributed to ``source`` (a path) if it has none yet."""
        if self.source is None:
            self.source = source
            self.args = (self._render(),)
        return self


# --- field checks (each raises ConfigError naming the field) ------------------------


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(value: object, field: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ConfigError(f"must be an integer in {low}..{high}, got {_describe(value)}", field=field)
    return value


def _check_text(value: object, field: str) -> str:
    if type(value) is not str or not value:
        raise ConfigError(f"must be a non-empty string, got {_describe(value)}", field=field)
    return value


def _check_name(value: object, field: str) -> str:
    name = _check_text(value, field)
    if not NODE_NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{name!r} is not a node name (1..64 letters, digits, '_', '.', '-'; "
            "starting with a letter or digit)",
            field=field,
        )
    return name


def _check_host(value: object, field: str) -> str:
    host = _check_text(value, field)
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if ":" in host and host.rsplit(":", 1)[1].isdigit() and not host.startswith("["):
        raise ConfigError(
            f"{host!r} is not a host name or IP address (put the port in the 'port' field)", field=field
        )
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{host!r} is not a host name or IP address", field=field)
    return host


def _check_weight(value: object, field: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type,operator]
        raise ConfigError(f"must be a finite number > 0, got {_describe(value)}", field=field)
    return float(value)  # type: ignore[arg-type]


def _check_timeout(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise ConfigError(f"must be a number of seconds in 0..3600, got {_describe(value)}", field=field)
    return float(value)


def _check_partitions(value: object, field: str) -> int:
    try:
        partition_bits(value)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigError(
            f"must be a power of two in 1..{PARTITIONS_MAX}, got {_describe(value)}", field=field
        ) from None
    return value  # type: ignore[return-value]


_FIELD_HINTS = {
    "vnodes": "; placement uses fixed partitions, not virtual nodes: set 'partitions' (specs/sharding.md)",
    "address": "; give 'host' and 'port' as two fields",
}


def _check_table(
    value: object, field: str, known: Sequence[str], required: Sequence[str] = ()
) -> dict[str, Any]:
    """``value`` as a table whose keys are all in ``known`` and include ``required``."""
    if not isinstance(value, dict):
        raise ConfigError(f"must be a table, got {_describe(value)}", field=field)
    for key in value:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = _FIELD_HINTS.get(str(key), f"; did you mean {hint[0]!r}?" if hint else "")
            raise ConfigError(
                f"unknown field (known: {', '.join(known)}){suggestion}",
                field=f"{field}.{key}" if field else str(key),
            )
    for key in required:
        if key not in value:
            raise ConfigError("is required", field=f"{field}.{key}" if field else key)
    return value


# --- the map ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class NodeSpec:
    """A node of the cluster: its name, where it listens, its zone and its weight."""

    name: str
    host: str
    port: int
    zone: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        where = f"node {self.name!r}"
        try:
            _check_host(self.host, "host")
            _check_int(self.port, "port", 1, 65535)
            if self.zone is not None:
                _check_text(self.zone, "zone")
            object.__setattr__(self, "weight", _check_weight(self.weight, "weight"))
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} ({where})", field=exc.field) from None

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``."""
        return (self.host, self.port)

    def ring_node(self) -> RingNode:
        return RingNode(self.name, self.weight, self.zone)

    def to_wire(self) -> dict[str, Any]:
        value: dict[str, Any] = {"name": self.name, "host": self.host, "port": self.port}
        if self.zone is not None:
            value["zone"] = self.zone
        if self.weight != 1.0:
            value["weight"] = self.weight
        return value


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Where a key goes under one shard map."""

    partition: int
    replicas: tuple[str, ...]
    primary: NodeSpec
    epoch: int


@dataclasses.dataclass(frozen=True, eq=True)
class ShardMap:
    """Placement for one epoch: nodes, ring parameters and one replica set per partition.

    Construct with :meth:`build` (placement from the ring), :func:`load_cluster_config`,
    or :meth:`from_wire`. The constructor checks every invariant and raises
    :class:`ConfigError` naming the field: ``epoch`` in 1..2**63-1, ``partitions`` a
    power of two, ``replication_factor`` in 1..len(nodes), unique node names and
    addresses, and exactly ``partitions`` replica sets of distinct known nodes, each of
    1..``replication_factor`` + 1 members. ``replica_sets`` need not equal the ring's
    placement: the authority may promote a follower or drop a replica at a new epoch
    (fewer members), or add a joining replica while a partition moves (one more).
    """

    epoch: int
    replication_factor: int
    partitions: int
    nodes: tuple[NodeSpec, ...]
    replica_sets: tuple[tuple[str, ...], ...] = dataclasses.field(repr=False)
    _by_name: dict[str, NodeSpec] = dataclasses.field(init=False, repr=False, compare=False)
    _primaries: list[NodeSpec] = dataclasses.field(init=False, repr=False, compare=False)
    _shift: int = dataclasses.field(init=False, repr=False, compare=False)
    _wire: dict[str, Any] | None = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _check_int(self.epoch, "epoch", 1, EPOCH_MAX)
        bits = partition_bits(_check_partitions(self.partitions, "partitions"))
        for node in self.nodes:
            if not isinstance(node, NodeSpec):
                raise ConfigError(f"must be NodeSpec values, got {_describe(node)}", field="nodes")
        nodes = tuple(sorted(self.nodes, key=lambda node: node.name))
        object.__setattr__(self, "nodes", nodes)
        if not nodes:
            raise ConfigError("a shard map needs at least one node", field="nodes")
        by_name: dict[str, NodeSpec] = {}
        by_address: dict[tuple[str, int], str] = {}
        for node in nodes:
            if node.name in by_name:
                raise ConfigError(f"node {node.name!r} appears twice", field="nodes")
            other = by_address.get(node.address)
            if other is not None:
                raise ConfigError(
                    f"nodes {other!r} and {node.name!r} both listen on {node.host}:{node.port}", field="nodes"
                )
            by_name[node.name] = node
            by_address[node.address] = node.name
        _check_int(self.replication_factor, "replication_factor", 1, len(nodes))
        sets = self.replica_sets
        if isinstance(sets, list):
            sets = tuple(sets)
            object.__setattr__(self, "replica_sets", sets)
        if not isinstance(sets, tuple) or len(sets) != self.partitions:
            raise ConfigError(
                f"must hold one replica set per partition ({self.partitions}), got "
                f"{len(sets) if isinstance(sets, Sequence) else _describe(sets)}",
                field="replica_sets",
            )
        checked: set[tuple[str, ...]] = set()
        for partition, members in enumerate(sets):
            if members in checked:
                continue
            if isinstance(members, list):
                raise ConfigError(f"partition {partition}: replica sets must be tuples", field="replica_sets")
            if (
                not isinstance(members, tuple)
                or not 1 <= len(members) <= self.replication_factor + 1
                or len(set(members)) != len(members)
                or not all(name in by_name for name in members)
            ):
                raise ConfigError(
                    f"partition {partition}: {_describe(members)} is not 1..{self.replication_factor + 1} "
                    "distinct nodes of the map",
                    field="replica_sets",
                )
            checked.add(members)
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_primaries", [by_name[members[0]] for members in sets])
        object.__setattr__(self, "_shift", HASH_BITS - bits)

    # --- building -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        nodes: Iterable[NodeSpec],
        *,
        replication_factor: int,
        epoch: int = 1,
        partitions: int = PARTITIONS_DEFAULT,
    ) -> ShardMap:
        """The map whose replica sets are the ring's placement of ``nodes``.

        Costs one ring build (O(partitions x nodes)). Raises :class:`ConfigError` for an
        invalid map (see the class docstring).
        """
        nodes = tuple(nodes)
        names = [node.name for node in nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"node {duplicates[0]!r} appears twice", field="nodes")
        if not nodes:
            raise ConfigError("a shard map needs at least one node", field="nodes")
        _check_partitions(partitions, "partitions")
        _check_int(replication_factor, "replication_factor", 1, len(nodes))
        ring = HashRing([node.ring_node() for node in nodes], partitions=partitions)
        sets = tuple(ring.replica_table(replication_factor))
        return cls(epoch, replication_factor, partitions, nodes, sets)

    def ring(self) -> HashRing:
        """The ring of this map's nodes, weights, zones and partitions (built on each call)."""
        return HashRing([node.ring_node() for node in self.nodes], partitions=self.partitions)

    def with_nodes(self, nodes: Iterable[NodeSpec], *, epoch: int | None = None) -> ShardMap:
        """A map for a new node set with the ring's placement, at ``epoch`` (default: this epoch + 1)."""
        return ShardMap.build(
            nodes,
            replication_factor=self.replication_factor,
            epoch=self.epoch + 1 if epoch is None else epoch,
            partitions=self.partitions,
        )

    def with_epoch(self, epoch: int) -> ShardMap:
        """This placement at another epoch."""
        return ShardMap(epoch, self.replication_factor, self.partitions, self.nodes, self.replica_sets)

    def without_replica(self, name: str) -> ShardMap:
        """The next epoch's map with node ``name`` dropped from every replica set (a failed
        or retired replica): where it was primary, the next replica in the set takes over.
        Raises :class:`ConfigError` if some partition would be left without a replica."""
        self.node(name)
        sets = []
        for partition, members in enumerate(self.replica_sets):
            if name in members:
                members = tuple(m for m in members if m != name)
                if not members:
                    raise ConfigError(
                        f"node {name!r} is the last replica of partition {partition}: dropping it would lose "
                        "the partition's data",
                        field="replica_sets",
                    )
            sets.append(members)
        return ShardMap(self.epoch + 1, self.replication_factor, self.partitions, self.nodes, tuple(sets))

    def with_primary(self, name: str) -> ShardMap:
        """The next epoch's map with node ``name`` first (primary) in every replica set that
        holds it (a planned switchover, or promoting a follower by hand)."""
        self.node(name)
        sets = tuple(
            (name, *(m for m in members if m != name)) if name in members else members
            for members in self.replica_sets
        )
        return ShardMap(self.epoch + 1, self.replication_factor, self.partitions, self.nodes, sets)

    def same_placement(self, other: ShardMap) -> bool:
        """Same epoch, node names and replica sets (addresses may differ)."""
        return (
            self.epoch == other.epoch
            and self.replica_sets == other.replica_sets
            and [n.name for n in self.nodes] == [n.name for n in other.nodes]
        )

    def followers_of(self, key: Key) -> tuple[str, ...]:
        """The replicas of ``key``'s partition other than its primary."""
        return self.replica_sets[self.partition_of(key)][1:]

    def plan_to(self, new: ShardMap) -> RebalancePlan:
        """What moves from this map's replica sets to ``new``'s.

        Raises ``ValueError`` if the partition counts differ.
        """
        if new.partitions != self.partitions:
            raise ValueError(
                f"maps with different partition counts ({self.partitions} vs {new.partitions}) "
                "cannot be compared"
            )
        return RebalancePlan.from_tables(
            self.replica_sets,
            new.replica_sets,
            old_shares=_target_shares(self.nodes),
            new_shares=_target_shares(new.nodes),
        )

    # --- routing --------------------------------------------------------------------

    def node(self, name: str) -> NodeSpec:
        """The node called ``name``; raises ``KeyError`` if the map has none."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def partition_of(self, key: Key) -> int:
        """The partition of ``key``; raises ``TypeError`` unless it is str or bytes-like."""
        return key_hash(key) >> self._shift

    def replicas_of(self, key: Key) -> tuple[str, ...]:
        """The replica set holding ``key``, primary first."""
        return self.replica_sets[key_hash(key) >> self._shift]

    def primary_of(self, key: Key) -> NodeSpec:
        """The node that serves ``key`` in this epoch."""
        return self._primaries[key_hash(key) >> self._shift]

    def route(self, key: Key) -> Route:
        """Partition, replica set, primary and epoch for ``key``."""
        partition = key_hash(key) >> self._shift
        return Route(partition, self.replica_sets[partition], self._primaries[partition], self.epoch)

    def partition_counts(self) -> dict[str, int]:
        """Partitions each node is primary for (every node listed, sorted by name)."""
        counts = {node.name: 0 for node in self.nodes}
        for node in self._primaries:
            counts[node.name] += 1
        return counts

    def replica_counts(self) -> dict[str, int]:
        """Partitions each node holds a copy of, as primary or follower (sorted by name)."""
        counts = {node.name: 0 for node in self.nodes}
        for members in self.replica_sets:
            for name in members:
                counts[name] += 1
        return counts

    # --- the wire -------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """This map as CBOR-able data (computed once; do not mutate the result).

        Replica sets travel as the list of distinct sets (node indexes into ``nodes``)
        plus ``set_of_partition``: one big-endian set index per partition, 1, 2 or 4 bytes
        wide. See ``specs/sharding.md``.
        """
        if self._wire is not None:
            return self._wire
        node_index = {node.name: index for index, node in enumerate(self.nodes)}
        set_index: dict[tuple[str, ...], int] = {}
        indexes = [set_index.setdefault(members, len(set_index)) for members in self.replica_sets]
        width = 1 if len(set_index) <= 2**8 else 2 if len(set_index) <= 2**16 else 4
        packed = array(_ARRAY_CODES[width], indexes)
        if width > 1 and sys.byteorder == "little":
            packed.byteswap()
        wire = {
            "v": WIRE_FORMAT_VERSION,
            "placement": PLACEMENT_VERSION,
            "epoch": self.epoch,
            "partitions": self.partitions,
            "replication_factor": self.replication_factor,
            "nodes": [node.to_wire() for node in self.nodes],
            "sets": [[node_index[name] for name in members] for members in set_index],
            "set_of_partition": packed.tobytes(),
        }
        object.__setattr__(self, "_wire", wire)
        return wire

    @classmethod
    def from_wire(cls, value: object) -> ShardMap:
        """A map from :meth:`to_wire` data; raises :class:`ConfigError` (source ``<wire>``) if invalid."""
        try:
            return cls._from_wire(value)
        except ConfigError as exc:
            raise exc.with_source("<wire>") from None

    @classmethod
    def _from_wire(cls, value: object) -> ShardMap:
        known = (
            "v",
            "placement",
            "epoch",
            "partitions",
            "replication_factor",
            "nodes",
            "sets",
            "set_of_partition",
        )
        data = _check_table(value, "", known, required=known)
        if data["v"] != WIRE_FORMAT_VERSION:
            raise ConfigError(f"unsupported shard map format {_describe(data['v'])}", field="v")
        if data["placement"] != PLACEMENT_VERSION:
            raise ConfigError(
                f"unsupported placement {_describe(data['placement'])} (this side: {PLACEMENT_VERSION})",
                field="placement",
            )
        partitions = _check_partitions(data["partitions"], "partitions")
        raw_nodes = data["nodes"]
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise ConfigError("must be a non-empty array of nodes", field="nodes")
        nodes = [
            _node_from_table(raw, f"nodes[{index}]", ("name", "host", "port", "zone", "weight"))
            for index, raw in enumerate(raw_nodes)
        ]
        names = [node.name for node in nodes]
        if names != sorted(set(names)):
            raise ConfigError("must be sorted by name without duplicates", field="nodes")
        raw_sets = data["sets"]
        if not isinstance(raw_sets, list) or not raw_sets:
            raise ConfigError("must be a non-empty array of replica sets", field="sets")
        sets: list[tuple[str, ...]] = []
        for index, raw in enumerate(raw_sets):
            if not isinstance(raw, list) or not all(type(i) is int and 0 <= i < len(nodes) for i in raw):
                raise ConfigError(
                    f"must be an array of node indexes, got {_describe(raw)}", field=f"sets[{index}]"
                )
            sets.append(tuple(names[i] for i in raw))
        packed = data["set_of_partition"]
        if (
            not isinstance(packed, bytes)
            or len(packed) % partitions
            or len(packed) // partitions not in _ARRAY_CODES
        ):
            raise ConfigError(
                f"must be {partitions} set indexes of 1, 2 or 4 bytes", field="set_of_partition"
            )
        indexes = array(_ARRAY_CODES[len(packed) // partitions])
        indexes.frombytes(packed)
        if indexes.itemsize > 1 and sys.byteorder == "little":
            indexes.byteswap()
        if max(indexes) >= len(sets):
            raise ConfigError(f"names set {max(indexes)} of {len(sets)}", field="set_of_partition")
        return cls(
            _check_int(data["epoch"], "epoch", 1, EPOCH_MAX),
            data["replication_factor"],
            partitions,
            tuple(nodes),
            tuple(sets[i] for i in indexes),
        )

    def encode(self) -> bytes:
        """This map as CBOR bytes."""
        return encode_value(self.to_wire())

    @classmethod
    def decode(cls, data: bytes) -> ShardMap:
        """A map from :meth:`encode` bytes; raises :class:`ConfigError` for bad CBOR or a bad map."""
        try:
            value = decode_value(data)
        except FrameError as exc:
            raise ConfigError(str(exc), source="<wire>") from None
        return cls.from_wire(value)

    @classmethod
    def load(cls, path: str | Path) -> ShardMap:
        """The shard map of the cluster file at ``path`` (see :func:`load_cluster_config`)."""
        return load_cluster_config(path).shard_map


def _array_code(size: int) -> str:
    for code in ("B", "H", "I", "L"):
        if array(code).itemsize == size:
            return code
    raise RuntimeError(f"no array type code is {size} bytes wide")  # pragma: no cover


_ARRAY_CODES = {1: _array_code(1), 2: _array_code(2), 4: _array_code(4)}


def _target_shares(nodes: Sequence[NodeSpec]) -> dict[str, float]:
    total = math.fsum(node.weight for node in nodes)
    return {node.name: node.weight / total for node in nodes}


def _node_from_table(raw: object, field: str, known: Sequence[str]) -> NodeSpec:
    table = _check_table(raw, field, known, required=("name", "host", "port"))
    name = _check_name(table["name"], f"{field}.name")
    where = f" (node {name!r})"
    try:
        zone = table.get("zone")
        return NodeSpec(
            name,
            _check_host(table["host"], f"{field}.host"),
            _check_int(table["port"], f"{field}.port", 1, 65535),
            None if zone is None else _check_text(zone, f"{field}.zone"),
            _check_weight(table.get("weight", 1), f"{field}.weight"),
        )
    except ConfigError as exc:
        if exc.field is not None and exc.field.startswith(field):
            exc.message += where
            exc.args = (exc._render(),)
        raise


# --- the configuration file ---------------------------------------------------------

REPLICATION_FACTOR_DEFAULT = 3
CLUSTER_FIELDS = ("epoch", "replication_factor", "partitions", "data_dir", "services")
COORDINATOR_FIELDS = ("host", "port", "data_dir", "failure_timeout_s")
NODE_FIELDS = ("name", "host", "port", "zone", "weight", "data_dir")
SECURITY_FIELDS = (
    "ca_file",
    "certs_dir",
    "client_cert",
    "token_secret_file",
    "peers",
    "admins",
    "client",
    "token_ttl_s",
)
TOP_LEVEL_TABLES = ("cluster", "coordinator", "nodes", "security")


@dataclasses.dataclass(frozen=True, slots=True)
class CoordinatorSpec:
    """Where the coordinator (the shard-map authority) listens and keeps its log."""

    host: str
    port: int
    data_dir: Path
    failure_timeout_s: float = 0.0
    """A replica not answering heartbeats for this long is marked down (0: only by
    ``txrpc ring mark-down``)."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Everything ``cluster.toml`` says: the shard map, the coordinator and data directories.

    Relative ``data_dir`` paths are resolved against the directory of the file.
    """

    shard_map: ShardMap
    coordinator: CoordinatorSpec | None
    data_dir: Path
    node_data_dirs: Mapping[str, Path]
    source: str
    services: tuple[str, ...] = ()
    """``MODULE:NAME`` (or ``path/file.py:NAME``, relative to the file) of the services
    every shard node hosts (``txrpc shard`` loads them)."""
    security: ClusterSecurity | None = None
    """The ``[security]`` table: TLS/mTLS, tokens, peers and admins (``specs/security.md``);
    None: plain TCP, no authentication (a trusted network only)."""

    def data_dir_for(self, node: str) -> Path:
        """The storage directory of ``node``: its own ``data_dir``, else ``<cluster data_dir>/<name>``.

        Raises ``KeyError`` for a node the cluster does not have.
        """
        self.shard_map.node(node)
        return self.node_data_dirs.get(node, self.data_dir / node)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>", base_dir: Path | None = None) -> ClusterConfig:
        """Parse a cluster file's text; raises :class:`ConfigError` naming the field."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"not valid TOML: {exc}", source=source) from None
        try:
            return cls._from_document(document, source, base_dir or Path.cwd())
        except ConfigError as exc:
            raise exc.with_source(source) from None

    @classmethod
    def _from_document(cls, document: dict[str, Any], source: str, base_dir: Path) -> ClusterConfig:
        _check_table(document, "", TOP_LEVEL_TABLES, required=("cluster", "nodes"))
        cluster = _check_table(
            document["cluster"], "cluster", CLUSTER_FIELDS, required=()
        )

        def directory(value: object, field: str) -> Path:
            path = Path(_check_text(value, field)).expanduser()
            return path if path.is_absolute() else base_dir / path

        raw_nodes = document["nodes"]
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise ConfigError("must be one or more [[nodes]] tables", field="nodes")
        nodes: list[NodeSpec] = []
        node_dirs: dict[str, Path] = {}
        seen_names: dict[str, int] = {}
        seen_addresses: dict[tuple[str, int], str] = {}
        for index, raw in enumerate(raw_nodes):
            field = f"nodes[{index}]"
            node = _node_from_table(raw, field, NODE_FIELDS)
            if node.name in seen_names:
                raise ConfigError(
                    f"duplicate node {node.name!r} (also nodes[{seen_names[node.name]}])",
                    field=f"{field}.name",
                )
            other = seen_addresses.get(node.address)
            if other is not None:
                raise ConfigError(
                    f"{node.host}:{node.port} is also the address of node {other!r}", field=f"{field}.port"
                )
            seen_names[node.name] = index
            seen_addresses[node.address] = node.name
            nodes.append(node)
            if "data_dir" in raw:
                node_dirs[node.name] = directory(raw["data_dir"], f"{field}.data_dir")

        epoch = _check_int(cluster.get("epoch", 1), "cluster.epoch", 1, EPOCH_MAX)
        partitions = _check_partitions(cluster.get("partitions", PARTITIONS_DEFAULT), "cluster.partitions")
        # Default: 3 copies (or one per node when there are fewer nodes).
        replication_factor = cluster.get("replication_factor", min(REPLICATION_FACTOR_DEFAULT, len(nodes)))
        if type(replication_factor) is not int or replication_factor < 1:
            raise ConfigError(
                f"must be an integer >= 1, got {_describe(replication_factor)}",
                field="cluster.replication_factor",
            )
        if replication_factor > len(nodes):
            raise ConfigError(
                f"{replication_factor} is larger than the node count ({len(nodes)}): "
                "a replica set cannot hold one node twice",
                field="cluster.replication_factor",
            )
        data_dir = directory(cluster.get("data_dir", "data"), "cluster.data_dir")

        coordinator = None
        if "coordinator" in document:
            table = _check_table(
                document["coordinator"], "coordinator", COORDINATOR_FIELDS, required=("host", "port")
            )
            coordinator = CoordinatorSpec(
                _check_host(table["host"], "coordinator.host"),
                _check_int(table["port"], "coordinator.port", 1, 65535),
                directory(table["data_dir"], "coordinator.data_dir")
                if "data_dir" in table
                else data_dir / "coordinator",
                _check_timeout(table.get("failure_timeout_s", 0.0), "coordinator.failure_timeout_s"),
            )
            other = seen_addresses.get((coordinator.host, coordinator.port))
            if other is not None:
                raise ConfigError(
                    f"{coordinator.host}:{coordinator.port} is also the address of node {other!r}",
                    field="coordinator.port",
                )
        shard_map = ShardMap.build(
            nodes, replication_factor=replication_factor, epoch=epoch, partitions=partitions
        )
        raw_services = cluster.get("services", [])
        if not isinstance(raw_services, list):
            raise ConfigError('must be a list of "MODULE:NAME" strings', field="cluster.services")
        services: list[str] = []
        for index, item in enumerate(raw_services):
            text = _check_text(item, f"cluster.services[{index}]")
            module, sep, name = text.partition(":")
            if not sep or not module or not name:
                raise ConfigError(
                    f'{text!r} is not MODULE:NAME (e.g. "examples/bank/service.py:bank")',
                    field=f"cluster.services[{index}]",
                )
            if module.endswith(".py") and not Path(module).is_absolute():
                module = str(base_dir / module)
            services.append(f"{module}:{name}")
        security = None
        if "security" in document:
            peers = ["coordinator", *(node.name for node in nodes)]
            security = _security_from_table(document["security"], directory, peers)
        return cls(shard_map, coordinator, data_dir, node_dirs, source, tuple(services), security)


def _names(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError("must be a list of names", field=field)
    return tuple(_check_text(item, f"{field}[{index}]") for index, item in enumerate(value))


def _security_from_table(
    raw: object, directory: Callable[[object, str], Path], default_peers: Sequence[str]
) -> ClusterSecurity:
    table = _check_table(raw, "security", SECURITY_FIELDS, required=("ca_file", "certs_dir"))
    client_cert = table.get("client_cert", "require")
    if client_cert not in ("require", "optional", "none"):
        message = f"must be require, optional or none, got {_describe(client_cert)}"
        raise ConfigError(message, field="security.client_cert")
    ttl = table.get("token_ttl_s", 3600.0)
    if type(ttl) not in (int, float) or not 0 < ttl <= 30 * 86400:
        message = f"must be a number of seconds in (0, 2592000], got {_describe(ttl)}"
        raise ConfigError(message, field="security.token_ttl_s")
    if client_cert != "require" and "token_secret_file" not in table:
        raise ConfigError(
            "without client certificates (client_cert = optional/none) callers need tokens: set token_secret_file",
            field="security.client_cert",
        )
    secret_file = table.get("token_secret_file")
    return ClusterSecurity(
        ca_file=directory(table["ca_file"], "security.ca_file"),
        certs_dir=directory(table["certs_dir"], "security.certs_dir"),
        client_cert=client_cert,
        token_secret_file=None if secret_file is None else directory(secret_file, "security.token_secret_file"),
        peers=_names(table["peers"], "security.peers") if "peers" in table else tuple(default_peers),
        admins=_names(table.get("admins", ["admin"]), "security.admins"),
        client=_check_text(table.get("client", "client"), "security.client"),
        token_ttl_s=float(ttl),
    )


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read and check ``cluster.toml`` at ``path`` and build its shard map.

    Raises :class:`ConfigError` (with ``source`` = the path and ``field`` = the
    offending field) for unreadable files, invalid TOML, unknown fields, missing or
    mistyped fields, duplicate nodes or addresses, unparsable hosts or ports, or a
    replication factor larger than the node count.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the cluster file: {exc}", source=str(path)) from None
    return ClusterConfig.from_toml(text, source=str(path), base_dir=path.parent.resolve())
