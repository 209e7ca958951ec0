"""Routing by key under an epoch-fenced shard map.

Client side: :class:`ClusterClient` sends a call for a key to the primary of the key's
partition and carries the map's epoch in the call metadata (key ``"epoch"``). A server
on another epoch answers ``WRONG_EPOCH`` with its map; the client adopts that map if it
is newer (or asks its ``map_source``), routes again and retries, at most
``epoch_retries_max`` times.

Server side: :func:`check_epoch` (or an :class:`EpochGuard` holding the server's
current map) is the first thing a shard-routed handler does; it raises
:class:`~txrpc.WrongEpoch` with ``details["shard_map"]`` before anything runs, which
is what makes the client's retry safe. The protocol is in ``specs/sharding.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import trio

from ._client import Client, connect
from ._errors import DeadlineExceeded, FailedPrecondition, ProtocolError, RpcError, Unavailable, WrongEpoch
from ._ring import Key
from ._security import Credentials, current_credentials
from ._service import current_call
from ._shardmap import ConfigError, NodeSpec, ShardMap

log = logging.getLogger("txrpc.routing")

EPOCH_METADATA_KEY = "epoch"
"""The call-metadata key that carries the caller's shard-map epoch."""

Connector = Callable[[str, int], AbstractAsyncContextManager[Client]]
"""Opens a client for ``(host, port)``; ``txrpc.connect`` by default (tests pass their own)."""
MAP_REFRESH_TIMEOUT_S = 5.0
"""Bound on one fetch of the shard map from its source after a node was unreachable."""
MapSource = Callable[[], Awaitable[ShardMap]]
"""Fetches the current shard map from the authority (for example the coordinator)."""


# --- server side ----------------------------------------------------------------------


def check_epoch(shard_map: ShardMap, *, key: Key | None = None, node: str | None = None) -> None:
    """Refuse the call being served unless it carries ``shard_map``'s epoch.

    Call it inside a handler, before any side effect. Raises :class:`~txrpc.WrongEpoch`
    (details: ``shard_map`` = ``shard_map.to_wire()``, ``epoch``, ``call_epoch``) when
    the call's ``"epoch"`` metadata is missing or differs. With ``key`` and ``node``,
    also raises :class:`~txrpc.FailedPrecondition` if ``node`` is not the key's primary
    in this epoch (a routing bug: both sides agree on the epoch). Raises
    ``RuntimeError`` outside a handler.
    """
    call_epoch = current_call().metadata.get(EPOCH_METADATA_KEY)
    if type(call_epoch) is not int or call_epoch != shard_map.epoch:
        described = "no epoch" if call_epoch is None else f"epoch {call_epoch!r}"
        raise WrongEpoch(
            f"call carries {described}; this server is at epoch {shard_map.epoch}",
            details={"shard_map": shard_map.to_wire(), "epoch": shard_map.epoch, "call_epoch": call_epoch},
        )
    if key is not None and node is not None and shard_map.primary_of(key).name != node:
        route = shard_map.route(key)  # (built only to describe the refusal)
        raise FailedPrecondition(
            f"node {node!r} is not the primary of partition {route.partition} at epoch "
            f"{shard_map.epoch} (the primary is {route.primary.name!r})",
            details={
                "partition": route.partition,
                "primary": route.primary.name,
                "epoch": shard_map.epoch,
            },
        )


class EpochGuard:
    """A server's current shard map, and the epoch check against it.

    ``guard.check(key)`` in every shard-routed handler; ``guard.install(new_map)`` when
    the authority publishes a new epoch. Epochs only move forward.
    """

    def __init__(self, shard_map: ShardMap, *, node: str | None = None) -> None:
        """``node``: this server's node name; when given, :meth:`check` with a key also
        verifies this node is the key's primary. Raises ``KeyError`` if the map lacks it."""
        if node is not None:
            shard_map.node(node)
        self._shard_map = shard_map
        self.node = node

    @property
    def shard_map(self) -> ShardMap:
        return self._shard_map

    @property
    def epoch(self) -> int:
        return self._shard_map.epoch

    def install(self, shard_map: ShardMap) -> bool:
        """Adopt ``shard_map`` if its epoch is newer; return whether it was adopted.

        An older map is ignored (False). Raises ``ValueError`` for a different map with
        the same epoch: an epoch names exactly one map.
        """
        current = self._shard_map
        if shard_map.epoch < current.epoch:
            return False
        if shard_map.epoch == current.epoch:
            if shard_map != current:
                raise ValueError(f"two different shard maps claim epoch {current.epoch}")
            return False
        self._shard_map = shard_map
        return True

    def replace(self, shard_map: ShardMap) -> None:
        """Adopt ``shard_map`` from the authority even at this map's epoch (a node whose
        file listed other nodes than the authority's map at that epoch); never older."""
        if shard_map.epoch < self._shard_map.epoch:
            raise ValueError(f"epoch {shard_map.epoch} is older than {self._shard_map.epoch}")
        self._shard_map = shard_map

    def check(self, key: Key | None = None) -> ShardMap:
        """:func:`check_epoch` against the current map; returns that map."""
        shard_map = self._shard_map
        check_epoch(shard_map, key=key, node=self.node)
        return shard_map


# --- client side ----------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Held:
    client: Client
    release: trio.Event


class ClusterClient:
    """Routes calls by key to the primary of the key's partition, fenced by epoch.

    ``async with txrpc.ClusterClient(shard_map) as cluster:`` then
    ``await cluster.call_for_key("alice", "bank.balance", "alice")``,
    ``await cluster.call("bank.balance", "alice")`` (routed by the first argument) or
    ``await cluster.bank.balance("alice")``. One connection per node address is opened
    on first use and kept; a connection that breaks is reopened by
    :class:`~txrpc.Client`, with its usual safe retries.

    On ``WRONG_EPOCH`` the client adopts the server's map if it is newer, else asks
    ``map_source`` (if given), else waits ``epoch_retry_backoff_s`` (doubling, jittered
    by ``rng``, at most ``epoch_retry_backoff_max_s``), then routes again: at most
    ``epoch_retries_max`` retries per call, after which the last ``WrongEpoch`` is
    raised. Other errors propagate unchanged. The shard map only moves to newer epochs.
    """

    def __init__(
        self,
        shard_map: ShardMap,
        *,
        connect: Connector | None = None,
        map_source: MapSource | None = None,
        epoch_retries_max: int = 3,
        epoch_retry_backoff_s: float = 0.02,
        epoch_retry_backoff_max_s: float = 0.5,
        rng: random.Random | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """Raises ``ValueError`` for a negative retry count or a non-positive backoff.

        ``credentials`` (TLS and/or token, see :class:`~txrpc.Credentials`) are presented
        to every node; default: those :func:`~txrpc.use_credentials` set when the
        client is made. Ignored with a custom ``connect``."""
        if type(epoch_retries_max) is not int or epoch_retries_max < 0:
            raise ValueError(f"epoch_retries_max must be an integer >= 0, got {epoch_retries_max!r}")
        if not 0 < epoch_retry_backoff_s <= epoch_retry_backoff_max_s:
            raise ValueError("need 0 < epoch_retry_backoff_s <= epoch_retry_backoff_max_s")
        self._shard_map = shard_map
        if connect is None:
            chosen = credentials if credentials is not None else current_credentials()
            connect = functools.partial(_default_connect, credentials=chosen)
        self._connect: Connector = connect
        self._map_source = map_source
        self.epoch_retries_max = epoch_retries_max
        self.epoch_retry_backoff_s = epoch_retry_backoff_s
        self.epoch_retry_backoff_max_s = epoch_retry_backoff_max_s
        self._rng = rng or random.Random(0)
        self._held: dict[tuple[str, int], _Held] = {}
        self._connect_locks: dict[tuple[str, int], trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None
        self._closed = False
        self.epoch_retries = 0
        """WRONG_EPOCH answers retried so far (all calls): for tests and metrics."""

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> ClusterClient:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        return await self._nursery_manager.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        """Close every connection (without waiting); calls in flight fail with ``Unavailable``."""
        self._closed = True
        for held in list(self._held.values()):
            held.release.set()

    # --- the map ----------------------------------------------------------------------

    @property
    def shard_map(self) -> ShardMap:
        """The map calls are routed with now."""
        return self._shard_map

    def adopt(self, shard_map: ShardMap) -> bool:
        """Route with ``shard_map`` from now on if its epoch is newer; return whether it was.

        Connections to addresses the new map no longer has are closed.
        """
        if shard_map.epoch <= self._shard_map.epoch:
            return False
        log.info("shard map epoch %d -> %d", self._shard_map.epoch, shard_map.epoch)
        self._shard_map = shard_map
        addresses = {node.address for node in shard_map.nodes}
        for address, held in list(self._held.items()):
            if address not in addresses:
                held.release.set()
        return True

    async def refresh(self) -> bool:
        """Fetch the map from ``map_source`` and adopt it if newer (or, at the same epoch,
        if its placement differs: the source is the authority); False without a source."""
        if self._map_source is None:
            return False
        fetched = await self._map_source()
        current = self._shard_map
        if fetched.epoch == current.epoch and not fetched.same_placement(current):
            log.warning("shard map epoch %d: adopting the authority's placement over the file's", fetched.epoch)
            self._shard_map = fetched
            return True
        return self.adopt(fetched)

    # --- calls ------------------------------------------------------------------------

    def options(self, **options: Any) -> BoundClusterClient:
        """A view whose calls use ``options`` (as ``Client.options``: ``timeout``, ``metadata``,
        ``idempotency_key``, ``retries_max``). ``timeout`` bounds the whole routed call,
        retries included."""
        return BoundClusterClient(self, _merge_options({}, options))

    async def call_for_key(self, key: Key, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method(*args, **kwargs)`` on the primary of ``key``'s partition.

        Raises ``TypeError`` for a key that is not str or bytes-like, ``WrongEpoch``
        after ``epoch_retries_max`` retries, and whatever the call raises otherwise
        (``Unavailable`` if the primary cannot be reached, ...).
        """
        return await self._invoke(key, method, args, kwargs, {})

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call_for_key` with the first argument as the key."""
        if not args:
            raise TypeError(f"{method}: a routed call needs its key as the first argument")
        return await self._invoke(args[0], method, args, kwargs, {})

    def __getattr__(self, name: str) -> ClusterMethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return ClusterMethodProxy(self, name, {})

    def route(self, key: Key) -> NodeSpec:
        """The node a call for ``key`` goes to now."""
        return self._shard_map.primary_of(key)

    async def _invoke(
        self, key: Key, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> Any:
        timeout_s = options.get("timeout")
        if timeout_s is None:
            return await self._invoke_routed(key, method, args, kwargs, options)
        with trio.move_on_after(timeout_s) as scope:
            return await self._invoke_routed(key, method, args, kwargs, options)
        assert scope.cancelled_caught
        raise DeadlineExceeded(f"{method}: no answer within timeout of {timeout_s} s")

    async def _invoke_routed(
        self, key: Key, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]
    ) -> Any:
        user_metadata: dict[str, Any] = options.get("metadata") or {}
        client_options = {
            name: value for name, value in options.items() if name not in ("timeout", "metadata")
        }
        retries = 0
        while True:
            shard_map = self._shard_map
            primary = shard_map.primary_of(key)
            client = await self._client_for(primary)
            metadata = {**user_metadata, EPOCH_METADATA_KEY: shard_map.epoch}
            try:
                return await client.options(metadata=metadata, **client_options).call(method, *args, **kwargs)
            except WrongEpoch as exc:
                if retries >= self.epoch_retries_max:
                    raise
                retries += 1
                self.epoch_retries += 1
                if not await self._learn(exc, shard_map):
                    await trio.sleep(self._backoff_s(retries))
            except Unavailable as exc:
                # A connection closed because a newer map dropped its node, or the node is
                # down and the authority may have failed it over: nothing ran, so route
                # again under the newer map (within the same retry budget).
                if not exc.nothing_ran or not await self.newer_map_after_unavailable(shard_map):
                    raise
                if retries >= self.epoch_retries_max:
                    raise
                retries += 1

    async def newer_map_after_unavailable(self, sent_with: ShardMap) -> bool:
        """After a node could not be reached: is there (now) a newer map to route with?
        Asks ``map_source`` once (bounded) if the map has not moved meanwhile."""
        if self._shard_map.epoch == sent_with.epoch and self._map_source is not None:
            with trio.move_on_after(MAP_REFRESH_TIMEOUT_S):
                try:
                    await self.refresh()
                except (RpcError, OSError) as exc:
                    log.info("shard map not refreshed: %s", exc)
        return self._shard_map.epoch > sent_with.epoch

    async def _learn(self, error: WrongEpoch, sent_with: ShardMap) -> bool:
        """Adopt the newer map a ``WRONG_EPOCH`` points to; True if routing now uses a newer map."""
        offered = error.details.get("shard_map")
        if offered is not None:
            try:
                self.adopt(ShardMap.from_wire(offered))
            except ConfigError as exc:
                raise ProtocolError(f"WRONG_EPOCH carried an invalid shard map: {exc}") from None
        if self._shard_map.epoch <= sent_with.epoch:
            await self.refresh()
        return self._shard_map.epoch > sent_with.epoch

    def _backoff_s(self, retry: int) -> float:
        base = min(self.epoch_retry_backoff_s * 2.0 ** (retry - 1), self.epoch_retry_backoff_max_s)
        return base * self._rng.uniform(0.5, 1.0)

    def held_client(self, node: NodeSpec) -> Client | None:
        """The open client for ``node``, if there is one (never waits)."""
        held = self._held.get(node.address)
        if held is not None and not held.release.is_set():
            return held.client
        return None

    async def _client_for(self, node: NodeSpec) -> Client:
        held_client = self.held_client(node)
        if held_client is not None:
            return held_client
        address = node.address
        if self._nursery is None or self._closed:
            raise Unavailable("cluster client is closed (use it inside `async with`)", {"not_started": True})
        lock = self._connect_locks.setdefault(address, trio.Lock())
        async with lock:
            held = self._held.get(address)
            if held is not None and not held.release.is_set():
                return held.client
            client: Client = await self._nursery.start(self._hold, address)
            return client

    async def _hold(self, address: tuple[str, int], *, task_status: trio.TaskStatus[Client]) -> None:
        """Own one connection: open it, hand it out, close it when released (one task per address)."""
        release = trio.Event()
        async with self._connect(*address) as client:
            held = _Held(client, release)
            self._held[address] = held
            try:
                task_status.started(client)
                await release.wait()
            finally:
                if self._held.get(address) is held:
                    del self._held[address]


def _default_connect(
    host: str, port: int, *, credentials: Credentials | None = None
) -> AbstractAsyncContextManager[Client]:
    return connect(host, port, credentials=credentials)


def _merge_options(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    allowed = {"timeout", "metadata", "idempotency_key", "retries_max"}
    unknown = set(changes) - allowed
    if unknown:
        raise TypeError(f"unknown call options: {sorted(unknown)}")
    merged = dict(base)
    for name, value in changes.items():
        if name == "metadata":
            merged["metadata"] = {**(base.get("metadata") or {}), **(value or {})}
        else:
            merged[name] = value
    return merged


class BoundClusterClient:
    """A :class:`ClusterClient` view with fixed call options (from ``cluster.options(...)``)."""

    def __init__(self, cluster: ClusterClient, options: dict[str, Any]) -> None:
        self._cluster = cluster
        self._options = options

    def options(self, **options: Any) -> BoundClusterClient:
        return BoundClusterClient(self._cluster, _merge_options(self._options, options))

    async def call_for_key(self, key: Key, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return await self._cluster._invoke(key, method, args, kwargs, self._options)

    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise TypeError(f"{method}: a routed call needs its key as the first argument")
        return await self._cluster._invoke(args[0], method, args, kwargs, self._options)

    def __getattr__(self, name: str) -> ClusterMethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return ClusterMethodProxy(self._cluster, name, self._options)


class ClusterMethodProxy:
    """``cluster.bank.withdraw`` → a callable routed by its first argument."""

    __slots__ = ("_cluster", "_name", "_options")

    def __init__(self, cluster: ClusterClient, name: str, options: dict[str, Any]) -> None:
        self._cluster = cluster
        self._name = name
        self._options = options

    def __getattr__(self, name: str) -> ClusterMethodProxy:
        if name.startswith("_"):
            raise AttributeError(name)
        return ClusterMethodProxy(self._cluster, f"{self._name}.{name}", self._options)

    def __call__(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        if not args:
            raise TypeError(f"{self._name}: a routed call needs its key as the first argument")
        return self._cluster._invoke(args[0], self._name, args, kwargs, self._options)

    def __repr__(self) -> str:
        return f"<txrpc routed method {self._name!r}>"
