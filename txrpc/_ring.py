"""Placement: keys → fixed partitions → replica sets, by weighted rendezvous hashing.

A key is hashed once with XXH3-64 (``str`` keys as UTF-8; never Python's ``hash()``,
so placement does not depend on ``PYTHONHASHSEED``); the top ``log2(partitions)``
bits of the hash name its partition. Partitions never split or merge, so data moves
between nodes in whole partitions. Each partition ranks the nodes by a weighted
rendezvous score (highest random weight); its replica set is the top of that ranking,
spread across zones when nodes carry one. Every table is computed once per ring, so
``lookup(key)`` is one hash, one shift and one list index.

The algorithm, its bounds and why it was chosen over a ring of virtual nodes are in
``specs/sharding.md``. Nothing here does I/O; rings are immutable values.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import math
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeAlias

import xxhash

_xxh3_64 = xxhash.xxh3_64_intdigest

Key: TypeAlias = str | bytes | bytearray | memoryview
"""What can be placed: ``str`` (hashed as its UTF-8 bytes) or a bytes-like object."""

PARTITIONS_DEFAULT = 32768
"""Partitions of a ring unless told otherwise (2**15; see ``specs/sharding.md`` for the bound it buys)."""
PARTITIONS_MAX = 2**20
"""Largest partition count a ring accepts (tables are built in pure Python)."""
HASH_BITS = 64
PLACEMENT_VERSION = "hrw-xxh3-v1"
"""Names the hash, the partition rule and the scoring rule; a change to any of them is a new version."""

_NODE_SEED_PREFIX = b"txrpc-node:"
_SCALE = 2.0**-52


def key_hash(key: Key) -> int:
    """The stable 64-bit hash of ``key``: XXH3-64, seed 0, of its UTF-8 (``str``) or raw bytes.

    Raises ``TypeError`` for any other type.
    """
    if type(key) is str:
        return _xxh3_64(key.encode())
    if isinstance(key, str):  # a str subclass
        return _xxh3_64(str.encode(key))
    if isinstance(key, (bytes, bytearray, memoryview)):
        return _xxh3_64(key)
    raise TypeError(f"a key must be str or bytes-like, not {type(key).__name__}")


def partition_bits(partitions: int) -> int:
    """``log2(partitions)``.

    Raises ``ValueError`` unless ``partitions`` is a power of two in 1..PARTITIONS_MAX.
    """
    if type(partitions) is not int or not 1 <= partitions <= PARTITIONS_MAX or partitions & (partitions - 1):
        raise ValueError(f"partitions must be a power of two in 1..{PARTITIONS_MAX}, got {partitions!r}")
    return partitions.bit_length() - 1


def partition_of(key: Key, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``: the top ``log2(partitions)`` bits of its hash."""
    return key_hash(key) >> (HASH_BITS - partition_bits(partitions))


def partition_hash_range(partition: int, partitions: int) -> tuple[int, int]:
    """The half-open range ``[start, end)`` of 64-bit key hashes that fall in ``partition``."""
    bits = partition_bits(partitions)
    if not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} is outside 0..{partitions - 1}")
    width = 1 << (HASH_BITS - bits)
    return partition * width, (partition + 1) * width


def load_bound(share: float, partitions: int) -> float:
    """The documented bound on a node's load (share of partitions / target ``share``).

    ``1 + 6 * sqrt((1 - share) / (partitions * share))``: six standard deviations of the
    node's partition count, which is binomial(partitions, share) over the choice of node
    names. By the Chernoff bound a node exceeds it with probability below
    ``exp(-36 (1 - share) / (2 + delta))`` (about 2e-7 for 10 equal nodes); see
    ``specs/sharding.md``. Raises ``ValueError`` unless ``0 < share <= 1``.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share!r}")
    partition_bits(partitions)
    return 1 + 6 * math.sqrt((1 - share) / (partitions * share))


@functools.lru_cache(maxsize=4)
def _partition_inputs(partitions: int) -> tuple[bytes, ...]:
    return tuple(p.to_bytes(4, "big") for p in range(partitions))


def node_seed(name: str) -> int:
    """The XXH3 seed that makes a node's rendezvous scores its own (a hash of its name)."""
    return _xxh3_64(_NODE_SEED_PREFIX + name.encode())


def rendezvous_score(name: str, weight: float, partition: int) -> float:
    """The score of node ``name`` for ``partition``; the highest score ranks first.

    ``ln(u) / weight`` with ``u`` uniform in (0, 1) taken from the top 52 bits of
    ``XXH3-64(partition as 4 big-endian bytes, seed=node_seed(name))``: the winner among
    nodes is node ``i`` with probability ``weight_i / sum(weights)``.
    """
    h = _xxh3_64(partition.to_bytes(4, "big"), node_seed(name))
    return math.log(((h >> 12) + 0.5) * _SCALE) / weight


@dataclasses.dataclass(frozen=True, slots=True)
class RingNode:
    """A node as the ring sees it: a name, a weight (share ∝ weight) and an optional zone.

    Nodes without a zone count as a zone of their own when replicas are spread.
    """

    name: str
    weight: float = 1.0
    zone: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a node name must be a non-empty string, got {self.name!r}")
        if (
            isinstance(self.weight, bool)
            or not isinstance(self.weight, (int, float))
            or not math.isfinite(self.weight)
            or self.weight <= 0
        ):
            raise ValueError(f"node {self.name!r}: weight must be a finite number > 0, not {self.weight!r}")
        if self.zone is not None and (not isinstance(self.zone, str) or not self.zone):
            raise ValueError(f"node {self.name!r}: zone must be a non-empty string or None: {self.zone!r}")
        object.__setattr__(self, "weight", float(self.weight))


NodeLike: TypeAlias = str | RingNode


def _as_ring_nodes(
    nodes: Iterable[NodeLike],
    weights: Mapping[str, float] | None,
    zones: Mapping[str, str] | None,
) -> tuple[RingNode, ...]:
    if isinstance(nodes, (str, bytes)):
        raise TypeError("nodes must be an iterable of names or RingNode, not a single string")
    result: dict[str, RingNode] = {}
    for item in nodes:
        if isinstance(item, RingNode):
            node = item
        elif isinstance(item, str):
            node = RingNode(item)
        else:
            raise TypeError(f"a node must be a name or a RingNode, not {type(item).__name__}")
        if node.name in result:
            raise ValueError(f"node {node.name!r} appears twice")
        if weights is not None and node.name in weights:
            node = dataclasses.replace(node, weight=weights[node.name])
        if zones is not None and node.name in zones:
            node = dataclasses.replace(node, zone=zones[node.name])
        result[node.name] = node
    for label, mapping in (("weights", weights), ("zones", zones)):
        unknown = sorted(set(mapping or ()) - set(result))
        if unknown:
            raise ValueError(f"{label} name nodes that are not in the ring: {unknown}")
    if not result:
        raise ValueError("a ring needs at least one node")
    return tuple(result[name] for name in sorted(result))


class HashRing:
    """Immutable placement of keys on nodes through fixed partitions.

    ``HashRing(["a", "b", "c"])``, or with ``weights={"a": 2}``, ``zones={"a": "z1"}``,
    or :class:`RingNode` items. The node order given does not matter. ``partitions``
    (a power of two) must be the same for the life of a cluster: it decides which
    keys share a partition.

    Promises: placement is a pure function of (nodes, weights, zones, partitions) and
    :data:`PLACEMENT_VERSION`; adding a node moves keys only to it; removing one moves
    only its keys; a replica set never repeats a node, and one node joining or leaving
    changes any replica set by at most one member. Building costs
    O(partitions x nodes) hashes (about 0.1 s for 32768 partitions and 10 nodes);
    lookups are O(1).
    """

    __slots__ = (
        "_by_name",
        "_columns",
        "_names",
        "_nodes",
        "_owners",
        "_partitions",
        "_shift",
        "_tables",
        "_zone_ids",
    )

    def __init__(
        self,
        nodes: Iterable[NodeLike],
        *,
        weights: Mapping[str, float] | None = None,
        zones: Mapping[str, str] | None = None,
        partitions: int = PARTITIONS_DEFAULT,
    ) -> None:
        """Build the ring; raises ``ValueError`` for no nodes, a repeated node, a bad
        weight or zone, or ``partitions`` not a power of two in 1..PARTITIONS_MAX."""
        partition_bits(partitions)
        self._setup(_as_ring_nodes(nodes, weights, zones), partitions, {})

    def _setup(
        self, nodes: tuple[RingNode, ...], partitions: int, known_columns: Mapping[RingNode, array[float]]
    ) -> None:
        bits = partition_bits(partitions)
        self._nodes = nodes
        self._names = tuple(node.name for node in self._nodes)
        self._by_name = {node.name: node for node in self._nodes}
        self._partitions = partitions
        self._shift = HASH_BITS - bits
        # Replicas spread over zone ids; a node without a zone is a zone of its own.
        zone_index: dict[tuple[str, str], int] = {}
        self._zone_ids = tuple(
            zone_index.setdefault(
                ("zone", node.zone) if node.zone is not None else ("node", node.name), len(zone_index)
            )
            for node in self._nodes
        )
        # The rendezvous score of every (node, partition), one compact column per node
        # (arrays of doubles: 8 bytes each, invisible to the garbage collector).
        # A node's column depends only on its name, weight and the partition count, so a
        # ring derived from another (with_node, without_node) reuses the columns it has.
        self._columns = tuple(
            known if (known := known_columns.get(node)) is not None else _score_column(node, partitions)
            for node in self._nodes
        )
        names = self._names
        # Ties go to the node whose name sorts first (index order is name order).
        self._owners: list[str] = [names[row.index(max(row))] for row in zip(*self._columns, strict=True)]
        self._tables: dict[int, list[tuple[str, ...]]] = {}

    # --- what the ring is -------------------------------------------------------------

    @property
    def nodes(self) -> tuple[RingNode, ...]:
        """The nodes, sorted by name."""
        return self._nodes

    @property
    def node_names(self) -> tuple[str, ...]:
        """The node names, sorted."""
        return self._names

    @property
    def partitions(self) -> int:
        """The number of partitions (a power of two)."""
        return self._partitions

    def node(self, name: str) -> RingNode:
        """The node called ``name``; raises ``KeyError`` if it is not in the ring."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[RingNode]:
        return iter(self._nodes)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HashRing):
            return NotImplemented
        return self._nodes == other._nodes and self._partitions == other._partitions

    def __hash__(self) -> int:
        return hash((self._nodes, self._partitions))

    def __repr__(self) -> str:
        shown = ", ".join(self._names[:8]) + (", ..." if len(self._names) > 8 else "")
        return f"HashRing([{shown}], nodes={len(self._nodes)}, partitions={self._partitions})"

    # --- lookups ------------------------------------------------------------------------

    def partition_of(self, key: Key) -> int:
        """The partition ``key`` falls in; raises ``TypeError`` for a key that is not str or bytes-like."""
        if type(key) is str:
            return _xxh3_64(key.encode()) >> self._shift
        return key_hash(key) >> self._shift

    def lookup(self, key: Key) -> str:
        """The name of the node owning ``key`` (its partition's primary).

        Raises ``TypeError`` for a key that is not str or bytes-like.
        """
        if type(key) is str:
            return self._owners[_xxh3_64(key.encode()) >> self._shift]
        return self._owners[key_hash(key) >> self._shift]

    def lookup_many(self, keys: Iterable[Key]) -> list[str]:
        """``[ring.lookup(k) for k in keys]``, faster (no call per key)."""
        owners = self._owners
        shift = self._shift
        xxh = _xxh3_64
        return [owners[(xxh(k.encode()) if type(k) is str else key_hash(k)) >> shift] for k in keys]

    def preference_list(self, key: Key, n: int) -> tuple[str, ...]:
        """The ``n`` distinct nodes holding ``key``, primary first (see :meth:`replicas_of_partition`).

        Raises ``ValueError`` unless ``1 <= n <= len(ring)``, ``TypeError`` for a bad key.
        The first call for a new ``n`` builds that table (O(partitions x nodes)).
        """
        table = self._tables.get(n)
        if table is None:
            table = self.replica_table(n)
        if type(key) is str:
            return table[_xxh3_64(key.encode()) >> self._shift]
        return table[key_hash(key) >> self._shift]

    def owner_of_partition(self, partition: int) -> str:
        """The primary of ``partition``; raises ``IndexError`` outside 0..partitions-1."""
        if partition < 0:
            raise IndexError(partition)
        return self._owners[partition]

    def replicas_of_partition(self, partition: int, n: int) -> tuple[str, ...]:
        """The replica set of ``partition``: ``n`` distinct nodes in rank order.

        The highest-ranked node is the primary. Zones: the set holds the best-ranked node
        of as many distinct zones as it can (at most ``n``); remaining places go to the
        best-ranked nodes left. Raises ``ValueError`` for a bad ``n``, ``IndexError`` for a
        bad partition.
        """
        if partition < 0:
            raise IndexError(partition)
        return self.replica_table(n)[partition]

    def owners(self) -> Sequence[str]:
        """The primary of every partition, indexed by partition (a read-only view)."""
        return tuple(self._owners)

    def replica_table(self, n: int) -> list[tuple[str, ...]]:
        """The replica set of every partition for replication factor ``n`` (cached; do not mutate).

        Raises ``ValueError`` unless ``1 <= n <= len(ring)``.
        """
        table = self._tables.get(n)
        if table is not None:
            return table
        if type(n) is not int or not 1 <= n <= len(self._nodes):
            raise ValueError(f"a replica set needs 1..{len(self._nodes)} nodes, asked for {n!r}")
        names = self._names
        if n == 1:
            table = [(owner,) for owner in self._owners]
        else:
            interned: dict[tuple[str, ...], tuple[str, ...]] = {}
            zone_ids = self._zone_ids
            spread = len(set(zone_ids)) < len(zone_ids)  # some nodes share a zone
            node_indexes = range(len(names))
            table = []
            for row in zip(*self._columns, strict=True):
                # Rank order: score descending, then name ascending (both sorts are stable).
                if spread:
                    order = sorted(node_indexes, key=row.__getitem__, reverse=True)
                    picked = _pick_spread(order, n, zone_ids)
                elif len(names) > 16:
                    picked = heapq.nlargest(n, node_indexes, key=row.__getitem__)
                else:
                    picked = sorted(node_indexes, key=row.__getitem__, reverse=True)[:n]
                members = tuple(names[i] for i in picked)
                table.append(interned.setdefault(members, members))
        self._tables[n] = table
        return table

    # --- load ---------------------------------------------------------------------------

    def partition_counts(self) -> dict[str, int]:
        """Partitions each node is primary for, by node name (sorted)."""
        counts = dict.fromkeys(self._names, 0)
        for owner in self._owners:
            counts[owner] += 1
        return counts

    def shares(self) -> dict[str, float]:
        """The fraction of the key space each node is primary for (sums to 1)."""
        return {name: count / self._partitions for name, count in self.partition_counts().items()}

    def target_shares(self) -> dict[str, float]:
        """The fraction each node would own with perfect balance: ``weight / sum(weights)``."""
        total = math.fsum(node.weight for node in self._nodes)
        return {node.name: node.weight / total for node in self._nodes}

    def load_ratio(self) -> float:
        """max over nodes of share / target share (1.0 is perfect; the bound is in ``specs/sharding.md``)."""
        targets = self.target_shares()
        return max(share / targets[name] for name, share in self.shares().items())

    def load_bound(self) -> float:
        """The documented bound on :meth:`load_ratio` for these nodes and weights (see :func:`load_bound`)."""
        return max(load_bound(share, self._partitions) for share in self.target_shares().values())

    def digest(self, replicas: int = 1) -> str:
        """A hex digest of the replica table for ``replicas``: equal digests mean equal placement."""
        hasher = xxhash.xxh3_128()
        for members in self.replica_table(replicas):
            hasher.update("\x1f".join(members).encode() + b"\x1e")
        return hasher.hexdigest()

    # --- changes ------------------------------------------------------------------------

    def with_node(self, node: NodeLike, *, weight: float | None = None, zone: str | None = None) -> HashRing:
        """A new ring with ``node`` added (this one is unchanged).

        Raises ``ValueError`` if a node of that name is already in the ring.
        """
        added = node if isinstance(node, RingNode) else RingNode(node)
        if weight is not None or zone is not None:
            added = RingNode(
                added.name,
                added.weight if weight is None else weight,
                added.zone if zone is None else zone,
            )
        if added.name in self._by_name:
            raise ValueError(f"node {added.name!r} is already in the ring")
        return self._derived(_as_ring_nodes((*self._nodes, added), None, None))

    def without_node(self, name: str) -> HashRing:
        """A new ring without node ``name``; raises ``ValueError`` if it is absent or the last node."""
        if name not in self._by_name:
            raise ValueError(f"node {name!r} is not in the ring")
        if len(self._nodes) == 1:
            raise ValueError(f"node {name!r} is the last node; a ring needs at least one")
        return self._derived(tuple(node for node in self._nodes if node.name != name))

    def _derived(self, nodes: tuple[RingNode, ...]) -> HashRing:
        """A ring of ``nodes`` (sorted, checked) with this ring's partitions, reusing its score columns."""
        ring = HashRing.__new__(HashRing)
        ring._setup(nodes, self._partitions, dict(zip(self._nodes, self._columns, strict=True)))
        return ring

    def plan_to(self, new: HashRing, replicas: int = 1) -> RebalancePlan:
        """The :class:`RebalancePlan` from this ring to ``new`` (see :meth:`RebalancePlan.between`)."""
        return RebalancePlan.between(self, new, replicas)


def _score_column(node: RingNode, partitions: int) -> array[float]:
    """``rendezvous_score(node.name, node.weight, p)`` for every partition ``p``, computed in bulk."""
    inputs = _partition_inputs(partitions)
    seed = node_seed(node.name)
    log = math.log
    xxh = _xxh3_64
    if node.weight == 1.0:  # dividing by 1.0 is exact: skip it
        return array("d", [log(((xxh(b, seed) >> 12) + 0.5) * _SCALE) for b in inputs])
    weight = node.weight
    return array("d", [log(((xxh(b, seed) >> 12) + 0.5) * _SCALE) / weight for b in inputs])


def _pick_spread(order: list[int], n: int, zone_ids: tuple[int, ...]) -> list[int]:
    """The first ``n`` of ``order`` preferring unseen zones; returned in ``order``'s order."""
    picked: list[int] = []  # positions in order
    seen: set[int] = set()
    for position, index in enumerate(order):
        zone = zone_ids[index]
        if zone not in seen:
            seen.add(zone)
            picked.append(position)
            if len(picked) == n:
                return [order[p] for p in picked]
    # Fewer zones than n: fill with the best-ranked nodes not yet picked.
    chosen = set(picked)
    for position in range(len(order)):
        if position not in chosen:
            picked.append(position)
            if len(picked) == n:
                break
    return [order[p] for p in sorted(picked)]


# --- rebalancing ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RangeMove:
    """A run of consecutive partitions whose replica set changes the same way.

    Keys whose 64-bit hash is in ``[hash_start, hash_end)`` are in partitions
    ``first_partition..last_partition`` (inclusive). ``before``/``after`` are the replica
    sets (primary first). ``gained`` receive a copy, copied from ``source`` (a node that
    holds the data before and still holds it after, else the old primary); ``dropped``
    delete theirs once the new epoch is in force.
    """

    first_partition: int
    last_partition: int
    hash_start: int
    hash_end: int
    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def partition_count(self) -> int:
        return self.last_partition - self.first_partition + 1

    @property
    def gained(self) -> tuple[str, ...]:
        """Nodes that hold the range after and not before, in ``after``'s order."""
        return tuple(name for name in self.after if name not in self.before)

    @property
    def dropped(self) -> tuple[str, ...]:
        """Nodes that held the range before and not after, in ``before``'s order."""
        return tuple(name for name in self.before if name not in self.after)

    @property
    def source(self) -> str:
        """Where new copies are copied from: the best-ranked old holder that stays, else the old primary."""
        for name in self.before:
            if name in self.after:
                return name
        return self.before[0]

    @property
    def primary_changed(self) -> bool:
        return self.before[0] != self.after[0]


@dataclasses.dataclass(frozen=True, slots=True)
class RebalancePlan:
    """What moves from one ring to another with the same partition count.

    ``moves`` lists the changed key ranges in partition order. ``fraction_moved`` is the
    fraction of the key space whose primary changes; ``fraction_optimal`` is the least
    any placement could move for the same change (the total variation distance between
    the old and new target shares: ``w_new / sum(w)`` when one node joins, the leaver's
    share when one leaves). ``copies`` counts partition copies to create over all
    replicas, out of ``partitions x replicas`` (with equal weights and no zones its
    optimum is ``fraction_optimal`` too; weights set primary shares, not copy counts).
    """

    partitions: int
    replicas: int
    nodes_added: tuple[str, ...]
    nodes_removed: tuple[str, ...]
    moves: tuple[RangeMove, ...]
    fraction_moved: float
    fraction_optimal: float
    copies: int

    @classmethod
    def between(cls, old: HashRing, new: HashRing, replicas: int = 1) -> RebalancePlan:
        """Compare the replica sets of ``old`` and ``new`` for ``replicas`` copies.

        Raises ``ValueError`` if the partition counts differ or ``replicas`` exceeds the
        node count of either ring.
        """
        if old.partitions != new.partitions:
            raise ValueError(
                f"rings with different partition counts ({old.partitions} vs {new.partitions}) "
                "cannot be compared: keys would change partitions"
            )
        return cls.from_tables(
            old.replica_table(replicas),
            new.replica_table(replicas),
            old_shares=old.target_shares(),
            new_shares=new.target_shares(),
        )

    @classmethod
    def from_tables(
        cls,
        before: Sequence[tuple[str, ...]],
        after: Sequence[tuple[str, ...]],
        *,
        old_shares: Mapping[str, float],
        new_shares: Mapping[str, float],
    ) -> RebalancePlan:
        """The plan between two replica tables (one replica set per partition, primary first).

        ``old_shares``/``new_shares`` are the target key-space shares of the nodes before
        and after (they name the nodes and set ``fraction_optimal``). Raises ``ValueError``
        if the tables differ in length or are not a power of two long.
        """
        partitions = len(before)
        if len(after) != partitions:
            raise ValueError(f"replica tables differ in length ({partitions} vs {len(after)})")
        partition_bits(partitions)
        moves: list[RangeMove] = []
        primary_moves = 0
        copies = 0
        run_start = -1
        for partition in range(partitions + 1):
            changed = partition < partitions and before[partition] != after[partition]
            if run_start >= 0 and (
                not changed or before[partition] != before[run_start] or after[partition] != after[run_start]
            ):
                start, _ = partition_hash_range(run_start, partitions)
                _, end = partition_hash_range(partition - 1, partitions)
                moves.append(
                    RangeMove(run_start, partition - 1, start, end, before[run_start], after[run_start])
                )
                run_start = -1
            if changed:
                if before[partition][0] != after[partition][0]:
                    primary_moves += 1
                copies += sum(1 for name in after[partition] if name not in before[partition])
                if run_start < 0:
                    run_start = partition
        optimal = math.fsum(
            max(0.0, new_shares.get(name, 0.0) - old_shares.get(name, 0.0))
            for name in sorted(set(old_shares) | set(new_shares))
        )
        return cls(
            partitions=partitions,
            replicas=len(after[0]) if partitions else 0,
            nodes_added=tuple(sorted(set(new_shares) - set(old_shares))),
            nodes_removed=tuple(sorted(set(old_shares) - set(new_shares))),
            moves=tuple(moves),
            fraction_moved=primary_moves / partitions,
            fraction_optimal=optimal,
            copies=copies,
        )

    @property
    def ratio_to_optimal(self) -> float:
        """``fraction_moved / fraction_optimal`` (1.0 is optimal; ``nan`` when nothing needed to move)."""
        if self.fraction_optimal == 0.0:
            return math.nan if self.fraction_moved == 0.0 else math.inf
        return self.fraction_moved / self.fraction_optimal

    @property
    def copies_fraction(self) -> float:
        """Partition copies to create as a fraction of all ``partitions x replicas`` copies."""
        return self.copies / (self.partitions * self.replicas)

    @property
    def partitions_changed(self) -> int:
        """Partitions whose replica set changes at all."""
        return sum(move.partition_count for move in self.moves)

    def transfers(self) -> dict[tuple[str, str], int]:
        """Partition copies to make, by ``(source, target)`` node pair, sorted by pair."""
        counts: dict[tuple[str, str], int] = {}
        for move in self.moves:
            source = move.source
            for target in move.gained:
                counts[(source, target)] = counts.get((source, target), 0) + move.partition_count
        return dict(sorted(counts.items()))

    def primary_transfers(self) -> dict[tuple[str, str], int]:
        """Partitions whose primary changes, by ``(old primary, new primary)``, sorted by pair."""
        counts: dict[tuple[str, str], int] = {}
        for move in self.moves:
            if move.primary_changed:
                pair = (move.before[0], move.after[0])
                counts[pair] = counts.get(pair, 0) + move.partition_count
        return dict(sorted(counts.items()))
