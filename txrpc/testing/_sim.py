"""The deterministic cluster simulator: a whole cluster in one ``trio.run``.

A :class:`Simulation` runs the production coordinator (``coordinator.run_coordinator``)
and shard nodes (``coordinator.run_shard``), and any clients, as task trees of one
``trio.run`` on a ``MockClock``. Each node runs with its own
:class:`txrpc._env.Environment` (a :class:`SimNode`), so its sockets are
:class:`~txrpc.testing.SimNetwork` connections, its wall clock is simulated (and can
be skewed), its fault points (``crash_point``, ``buggify``) are live, and its storage
runs inline on real SQLite files (no threads). One seed drives every random choice —
the network's faults, the crash points, ``buggify``, trio's own scheduler — so a seed
replays a run exactly (within one ``PYTHONHASHSEED``; :func:`replay_hint` prints both).

Node faults: :meth:`Simulation.crash` (cancel the node's tasks, drop its memory and
connections; storage stays), :meth:`Simulation.restart` (same storage), pause
(:meth:`Simulation.pause`), clock skew (:meth:`Simulation.skew`). Link faults: see
``txrpc.testing._network``.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import heapq
import itertools
import os
import random
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing

import txrpc
from storage import _threads as storage_threads
from storage._threads import NodeCrashed
from txrpc import _env
from txrpc._shardmap import ClusterConfig

from ._network import LinkFaults, SimListener, SimNetwork, SimStream

T = TypeVar("T")

COORDINATOR = "coordinator"
#: Seconds since the epoch at simulated time 0 (any fixed value; the wall clock is simulated).
WALL_EPOCH_S = 1_800_000_000.0
#: The longest a `storage.slow_io` buggify delay makes a storage call wait (simulated s).
STORAGE_DELAY_S_MAX = 0.005
#: Protocol-breaking switches the simulator can turn on (see ``txrpc._env.broken``).
BROKEN_SWITCHES = (
    "coordinator.skip_decision_write",
    "coordinator.commit_without_all_votes",
    "participant.release_locks_at_prepare",
    "server.skip_request_log_lookup",
    "replication.follower_skips_commit",
    "replication.follower_ignores_epoch",
)


class SimNode:
    """The environment of one simulated node (or client): implements ``txrpc._env.Environment``."""

    def __init__(self, sim: Simulation, node: str, skew_s: float = 0.0) -> None:
        self.sim = sim
        self.node = node
        self.skew_s = skew_s
        #: Set by :meth:`Simulation.crash`: code of this incarnation that still runs
        #: (shielded steps) can neither touch storage nor the network any more.
        self.crashed = False

    async def open_stream(self, host: str, port: int) -> trio.abc.Stream:
        if self.crashed:
            raise NodeCrashed(f"{self.node} crashed")
        stream: SimStream = await self.sim.network.connect(self.node, host, port)
        return stream

    async def open_listeners(self, host: str, port: int) -> list[trio.abc.Listener[Any]]:
        if self.crashed:
            raise NodeCrashed(f"{self.node} crashed")
        listener: SimListener = self.sim.network.listen(self.node, host, port)
        return [listener]

    def wall_time(self) -> float:
        return WALL_EPOCH_S + trio.current_time() + self.skew_s

    def buggify(self, name: str) -> bool:
        return self.sim._buggify(self.node, name)

    def storage_delay_s(self) -> float:
        """``buggify("storage.slow_io")``: a storage call waits up to 5 ms first (a slow
        disk), which widens every window in which a write is in flight."""
        if self.buggify("storage.slow_io"):
            return self.sim._buggify_rng.uniform(0.0, STORAGE_DELAY_S_MAX)
        return 0.0

    def crash_point(self, name: str) -> None:
        self.sim._crash_point(self.node, name)

    def broken(self, name: str) -> bool:
        return name in self.sim.broken


@dataclass
class SimOptions:
    """The shape of a simulated cluster and its protocol timeouts (simulated seconds)."""

    shards: int = 3
    partitions: int = 64
    link: LinkFaults = field(default_factory=LinkFaults)
    tx_timeout_s: float = 5.0
    phase_timeout_s: float = 1.0
    tx_idle_timeout_s: float = 3.0
    #: Crash points that may fire, with the probability of firing each time one is reached.
    crash_points: dict[str, float] = field(default_factory=dict)
    #: How long a node stays down after a crash point fired (then it restarts).
    restart_after_s: float = 0.5
    #: ``buggify`` points are each enabled with this probability per run (0 disables them).
    buggify_p: float = 0.0
    #: Frame deliveries are rounded up to multiples of this (simulated seconds; 0: exact).
    tick_s: float = 0.0005
    #: Protocol-breaking switches (test-only) turned on for this run.
    broken: frozenset[str] = frozenset()
    #: Copies of each partition (shards are replica sets of this many nodes; 1: none).
    replication_factor: int = 1
    #: The coordinator marks a replica down after this long without heartbeats (0: off).
    failure_timeout_s: float = 0.0


class Simulation:
    """A simulated cluster. Create it with :func:`simulate` (or inside a ``trio.run``
    on a ``MockClock`` via :meth:`open`)."""

    def __init__(
        self,
        seed: int,
        services: Iterable[txrpc.Service],
        data_dir: Path,
        options: SimOptions | None = None,
    ) -> None:
        self.seed = seed
        # A copy: heal() turns crash points and buggify off for this run only.
        self.options = dataclasses.replace(options) if options is not None else SimOptions()
        self.rng = random.Random(seed)
        self.network = SimNetwork(
            random.Random(self.rng.getrandbits(64)), default=self.options.link.copy(), tick_s=self.options.tick_s
        )
        self.services = list(services)
        self.data_dir = data_dir
        self.config = _sim_config(
            data_dir, self.options.shards, self.options.partitions, self.options.replication_factor
        )
        self.shard_names = [node.name for node in self.config.shard_map.nodes]
        self.envs: dict[str, SimNode] = {}
        self.client_names: list[str] = []
        self.broken = frozenset(self.options.broken)
        unknown = self.broken - set(BROKEN_SWITCHES)
        if unknown:
            raise ValueError(f"unknown broken switches {sorted(unknown)}; known: {BROKEN_SWITCHES}")
        self._fault_rng = random.Random(self.rng.getrandbits(64))
        self._buggify_rng = random.Random(self.rng.getrandbits(64))
        self._buggify_enabled: dict[str, bool] = {}
        #: How many times each ``buggify`` point fired.
        self.buggified: collections.Counter[str] = collections.Counter()
        self._scopes: dict[str, trio.CancelScope] = {}
        self._stopped: dict[str, trio.Event] = {}
        self.down: set[str] = set()
        self.participants: dict[str, Any] = {}
        self.coordinator: Any = None
        self.crashes: list[tuple[float, str, str]] = []  # (time, node, why)
        self._nursery: trio.Nursery | None = None
        #: Plain (non-cluster) servers: name → (services, host, port); see :meth:`add_server`.
        self.servers: dict[str, tuple[list[txrpc.Service], str, int]] = {}

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        seed: int,
        services: Iterable[txrpc.Service],
        data_dir: Path,
        options: SimOptions | None = None,
    ) -> AsyncIterator[Simulation]:
        sim = cls(seed, services, data_dir, options)
        async with trio.open_nursery() as nursery:
            sim._nursery = nursery
            await sim.start(COORDINATOR)
            for name in sim.shard_names:
                await sim.start(name)
            try:
                yield sim
            finally:
                for name in list(sim._scopes):
                    sim._scopes[name].cancel()
                nursery.cancel_scope.cancel()

    def env(self, node: str) -> SimNode:
        env = self.envs.get(node)
        if env is None:
            env = self.envs[node] = SimNode(self, node)
        return env

    def become(self, node: str) -> None:
        """Make the current task (and tasks it starts from now on) run as ``node``."""
        env = self.env(node)
        _env.current.set(env)
        storage_threads.inline.set(env)

    async def add_server(self, name: str, services: Iterable[txrpc.Service], host: str, port: int = 7000) -> None:
        """Add and start a plain server node (``txrpc.serve_services`` with a request log
        on its own storage, so idempotency keys work); crash and restart it like any node."""
        self.servers[name] = (list(services), host, port)
        await self.start(name)

    def storage_path(self, node: str) -> Path:
        """The directory holding ``node``'s SQLite database."""
        return self.data_dir / node

    async def start(self, node: str) -> None:
        """Start ``node`` (the coordinator, a shard or an added server) on its storage."""
        assert self._nursery is not None, "use Simulation.open()"
        if node in self._scopes:
            raise RuntimeError(f"{node} is already running")
        scope = trio.CancelScope()
        stopped = trio.Event()
        self._scopes[node] = scope
        self._stopped[node] = stopped
        self.down.discard(node)
        old_env = self.envs.get(node)
        # A new incarnation: the old one's lingering code keeps its (crashed) environment.
        self.envs[node] = SimNode(self, node, old_env.skew_s if old_env else 0.0)
        options = self.options
        from coordinator import run_coordinator, run_shard

        async def run_node(task_status: trio.TaskStatus[Any]) -> None:
            if node in self.servers:
                from txrpc._serve import serve_services

                services, host, port = self.servers[node]
                path = self.storage_path(node)
                path.mkdir(parents=True, exist_ok=True)
                await serve_services(services, host=host, port=port, db=path, task_status=task_status)
            elif node == COORDINATOR:
                await run_coordinator(
                    self.config,
                    tx_timeout_s=options.tx_timeout_s,
                    phase_timeout_s=options.phase_timeout_s,
                    rng_seed=self.rng.getrandbits(32),
                    failure_timeout_s=options.failure_timeout_s,
                    task_status=task_status,
                )
            else:
                await run_shard(
                    self.config,
                    node,
                    self.services,
                    tx_idle_timeout_s=options.tx_idle_timeout_s,
                    rng_seed=self.rng.getrandbits(32),
                    task_status=task_status,
                )

        async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            self.become(node)
            try:
                with scope:
                    await run_node(task_status)
            except* NodeCrashed:
                pass  # code that outlived the crash stopped at its first storage/network use
            finally:
                stopped.set()

        started = await self._nursery.start(run)
        if node in self.servers:
            pass
        elif node == COORDINATOR:
            self.coordinator = started
        else:
            self.participants[node] = started

    def crash(self, node: str, why: str = "crash") -> None:
        """Kill ``node`` now: its tasks are cancelled, its memory and connections dropped.
        Its storage stays for :meth:`restart`. Idempotent."""
        scope = self._scopes.pop(node, None)
        if scope is None:
            return
        self.crashes.append((trio.current_time(), node, why))
        self.down.add(node)
        self.env(node).crashed = True
        scope.cancel()
        self.network.crash(node)
        self.participants.pop(node, None)
        if node == COORDINATOR:
            self.coordinator = None

    async def restart(self, node: str) -> None:
        """Start a crashed node again on the same storage (waits for the old one to unwind)."""
        self.crash(node)
        await self._stopped[node].wait()
        await self.start(node)

    async def restart_all(self) -> None:
        for node in sorted(self.down):
            await self.restart(node)

    def pause(self, node: str, duration_s: float) -> None:
        """Stop ``node`` for ``duration_s``: nothing it sends leaves, nothing sent to it arrives."""
        self.network.pause(node, trio.current_time() + duration_s)

    def skew(self, node: str, offset_s: float) -> None:
        """Skew ``node``'s wall clock by ``offset_s`` (protocol timers use trio's clock)."""
        self.env(node).skew_s = offset_s

    def heal(self) -> None:
        """Remove every link fault, partition and pause; stop crash points and buggify."""
        self.network.heal()
        self.options.crash_points = {}
        self._buggify_enabled = {}
        self.options.buggify_p = 0.0

    # -- fault points ------------------------------------------------------------------

    def _crash_point(self, node: str, name: str) -> None:
        p = self.options.crash_points.get(name, 0.0)
        if p and self._fault_rng.random() < p:
            self.crash(node, why=name)
            assert self._nursery is not None
            self._nursery.start_soon(self._restart_later, node)

    async def _restart_later(self, node: str) -> None:
        await trio.sleep(self.options.restart_after_s)
        if node in self.down:
            await self.restart(node)

    def _buggify(self, node: str, name: str) -> bool:
        if not self.options.buggify_p:
            return False
        enabled = self._buggify_enabled.get(name)
        if enabled is None:
            enabled = self._buggify_enabled[name] = self._buggify_rng.random() < self.options.buggify_p
        if enabled and self._buggify_rng.random() < 0.25:
            self.buggified[name] += 1
            return True
        return False

    # -- clients -----------------------------------------------------------------------

    @asynccontextmanager
    async def client(self, name: str) -> AsyncIterator[txrpc.Cluster]:
        """A :class:`txrpc.Cluster` client running as node ``name`` (call from the task that uses it)."""
        self.become(name)
        limits = txrpc.Limits(connect_timeout_s=1.0, reconnect_backoff_s=0.05)
        cluster = txrpc.Cluster(self.config, limits=limits, rng=random.Random(self.rng.getrandbits(64)))
        async with cluster:
            yield cluster

    # -- observation -------------------------------------------------------------------

    def in_doubt(self) -> dict[int, str]:
        """Transactions prepared (undecided) on a running shard, or undecided at the
        coordinator: txid → where."""
        doubt: dict[int, str] = {}
        for name, participant in self.participants.items():
            for txid in participant.core.in_doubt():
                doubt[int(txid)] = f"prepared on {name}"
        return doubt

    async def wait_settled(self, timeout_s: float) -> dict[int, str]:
        """Wait (simulated time) until no transaction is in doubt; returns what is left."""
        deadline = trio.current_time() + timeout_s
        while trio.current_time() < deadline:
            if not self.down and not self.in_doubt():
                return {}
            await trio.sleep(0.1)
        return self.in_doubt()


def _sim_config(data_dir: Path, shards: int, partitions: int, replication_factor: int = 1) -> ClusterConfig:
    lines = [
        "[cluster]",
        f"replication_factor = {replication_factor}",
        f"partitions = {partitions}",
        f'data_dir = "{data_dir}"',
        "",
        "[coordinator]",
        'host = "10.0.0.1"',
        "port = 7000",
        "",
    ]
    for index in range(shards):
        lines += ["[[nodes]]", f'name = "s{index}"', f'host = "10.0.1.{index + 1}"', "port = 7000", ""]
    return ClusterConfig.from_toml("\n".join(lines), source="<simulation>")


def _sim_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


#: ``txrpc-sim-{seed}-p{pid}-{mkdtemp suffix}``: a simulation's data directory and the
#: process that made it (the seed comes first, for people; it may be negative).
_SIM_DIR = re.compile(r"txrpc-sim-(-?\d+)-p(\d+)-[a-z0-9_]{8}")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still run (when in doubt: yes, nothing is removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's; not a PID at all
        return True
    return True


def sweep_stale_sim_dirs(root: Path | None = None) -> list[Path]:
    """Remove the data directories of simulations whose process is gone: killed by
    SIGTERM (``sim explore``'s Ctrl-C stops its workers so) or SIGKILL, or left by
    ``os._exit``, their ``finally`` never ran, and ``/dev/shm`` is RAM. A directory whose
    process is alive (a zombie or a reused PID counts as alive) is left alone."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return []
    root = _sim_root() if root is None else root
    removed: list[Path] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _SIM_DIR.fullmatch(entry.name)
        if match is None:
            continue
        try:  # (ours first: another user's names are not ours to judge)
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:  # another sweeper was first
            continue
        if _pid_alive(int(match[2])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


@contextmanager
def deterministic_trio(seed: int) -> Iterator[None]:
    """Make trio's own choices reproducible for one run (within a process, too).

    trio shuffles each batch of runnable tasks with a private ``random.Random``
    (seeded here, and batches are sorted by task creation order first, as trio does
    under Hypothesis); it breaks ties between equal deadlines by ``id()`` of the cancel
    scope; and it walks sets of tasks and cancel statuses, whose order follows their
    hashes, i.e. memory addresses. For the run, deadline ties go by registration order
    and tasks and cancel statuses hash by creation order. These are private trio
    internals: if they are not as expected, the run still works, only without the
    within-process replay promise (a fresh process replays a seed regardless).
    """
    from trio._core import _run

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    _run._r.seed(seed)
    deadlines = getattr(_run, "Deadlines", None)
    task_class = getattr(_run, "Task", None)
    status_class = getattr(_run, "CancelStatus", None)
    usable = (
        hasattr(_run, "_ALLOW_DETERMINISTIC_SCHEDULING")
        and deadlines is not None
        and hasattr(deadlines, "add")
        and hasattr(task_class, "_counter")
        and hasattr(status_class, "__attrs_post_init__")
    )
    if usable:
        patch(_run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)
        order = itertools.count()

        def add(self: Any, deadline: float, cancel_scope: Any) -> None:
            heapq.heappush(self._heap, (deadline, next(order), cancel_scope))
            self._active += 1

        patch(deadlines, "add", add)
        task_base: list[int] = []

        def task_hash(self: Any) -> int:
            if not task_base:
                task_base.append(self._counter)
            return int(self._counter - task_base[0])

        patch(task_class, "__hash__", task_hash)
        statuses = itertools.count()
        post_init = status_class.__attrs_post_init__  # type: ignore[union-attr]

        class OrderedCancelStatus(status_class):  # type: ignore[misc, valid-type]
            """A CancelStatus hashed by creation order (one slot more; trio creates its
            cancel statuses by this module-level name)."""

            __slots__ = ("_creation_order",)

            def __attrs_post_init__(self) -> None:
                self._creation_order = next(statuses)
                post_init(self)

            def __hash__(self) -> int:
                return self._creation_order  # type: ignore[no-any-return]

        patch(_run, "CancelStatus", OrderedCancelStatus)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


_MISSING = object()


def replay_hint(seed: int) -> str:
    hash_seed = os.environ.get("PYTHONHASHSEED", "random")
    return f"seed={seed} (PYTHONHASHSEED={hash_seed})"


def _sim_clock() -> trio.testing.MockClock:
    """A ``MockClock`` (autojump at once) whose time is read without the real clock: at
    ``rate`` 0, as the simulator runs it, its time is where the last jump left it (the
    run loop and the protocol code read the time ~100 times per transaction)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    assert clock.rate == 0
    read = type(clock).current_time

    def current_time() -> float:
        return clock._virtual_base if clock._rate == 0 else read(clock)

    clock.current_time = current_time  # type: ignore[method-assign]
    return clock


def simulate(
    main: Callable[[Simulation], Awaitable[T]],
    *,
    seed: int,
    services: Iterable[txrpc.Service],
    options: SimOptions | None = None,
) -> T:
    """Run ``main(sim)`` against a fresh simulated cluster in its own ``trio.run`` on a
    ``MockClock``; returns what ``main`` returns. Storage lives in a temporary directory
    (on ``/dev/shm`` when available) removed afterwards."""
    sweep_stale_sim_dirs()  # what killed runs left behind
    data_dir = Path(tempfile.mkdtemp(prefix=f"txrpc-sim-{seed}-p{os.getpid()}-", dir=_sim_root()))
    result: list[T] = []

    async def root() -> None:
        async with Simulation.open(seed, services, data_dir, options) as sim:
            result.append(await main(sim))

    # Garbage collection runs finalizers at allocation-dependent moments; some of them
    # reach trio (async generator finalization). Collect now and hold it off during the
    # run so a seed replays the same way in any process, first run or hundredth.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with deterministic_trio(seed):
            trio.run(root, clock=_sim_clock())
    finally:
        if gc_was_enabled:
            gc.enable()
        shutil.rmtree(data_dir, ignore_errors=True)
    return result[0]


__all__ = ["COORDINATOR", "SimNode", "SimOptions", "Simulation", "replay_hint", "simulate"]
