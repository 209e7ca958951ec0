"""Synchronous replication of a shard's prepare and commit records (specs/replication.md).

Every node is the primary of some partitions and a follower of others (the shard map's
replica sets). A primary's :class:`Participant` uses :class:`Replication` to send each
prepare record to the followers of the partitions it touches and waits until every one
of them has it durable before voting yes; commits and aborts follow. A follower keeps a
replicated prepare record exactly as a participant keeps its own: durable, with its
write locks held, resolved by the commit/abort that follows or, if that never comes, by
the termination protocol (the coordinator's decision; for a transaction its primary
decided alone, the current primary's answer). A promoted follower therefore starts as a
recovered participant: in-doubt transactions hold their locks until they are resolved.

Fencing: every replication message carries the sender's shard-map epoch. A follower
refuses an older epoch (``WRONG_EPOCH``, with its map), refreshes its map from the
authority on a newer one, and refuses a sender that is not the primary of the keys at
that epoch. A deposed primary therefore cannot collect the acknowledgements it needs to
vote yes or to commit a transaction it decides alone.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import trio

import txrpc
from storage._shard_store import WriteSet
from txrpc import _env
from txrpc._client import DeadlinePassed
from txrpc._routing import EPOCH_METADATA_KEY, EpochGuard
from txrpc._shardmap import ShardMap

from ._batching import Alarms, Answers, Countdown, Rounds, run_all
from ._locks import Mode

if TYPE_CHECKING:
    from ._participant import Participant

log = logging.getLogger("txrpc.replication")

ClientFor = Callable[[str], Awaitable[txrpc.Client]]
"""Returns a (held) client for the node of that name."""

ORIGIN_SLOTS = 1024
"""A follower keeps a replicated record of transaction ``txid`` from a primary under the
id ``-(txid * ORIGIN_SLOTS + slot)``, ``slot`` being the number the follower gave that
primary when it first heard from it (stable for the life of the process, and restored
from the records' own ``origin`` at a restart -- not the primary's place in the map's
node list, which moves when a node is added or removed: two primaries of one
transaction then shared an id across the change). One transaction may reach one
follower from several primaries (and the node may be a participant of it too, under
``txid`` itself)."""


def record_id(txid: int, origin_index: int) -> int:
    return -(txid * ORIGIN_SLOTS + origin_index)


def txid_of(record: int) -> int:
    """The transaction id of a participant's own record or of a replicated one."""
    return (-record) // ORIGIN_SLOTS if record < 0 else record


REPLICATION_TIMEOUT_S_DEFAULT = 5.0
NOTICES_PER_MESSAGE_MAX = 512
NOTICE_WAIT_S = 0.02
"""How long a commit notice waits for prepare records to the same follower to ride on
before it goes on its own (``repl.commit_many``)."""
NO_RIDERS_RETRY_S = 300.0
"""A follower that refused notices riding on its prepare records (an older version) gets
its notices on their own for this long, then riders are tried again (it may have been
upgraded meanwhile; a refusal costs one message sent twice)."""
PREPARES_PER_MESSAGE_MAX = 256
"""Replicated prepare records per ``repl.prepare_many`` message."""
_Queued = tuple[int, int, WriteSet, Answers[str]]
"""A prepare record queued for a follower: (epoch, txid, share, where its ack goes)."""


def _prepare_messages(queued: list[_Queued]) -> list[tuple[int, list[tuple[int, WriteSet, Answers[str]]]]]:
    """A round's records as ``repl.prepare_many`` messages: one per epoch (the epoch
    travels in the call's metadata) and per ``PREPARES_PER_MESSAGE_MAX`` records."""
    by_epoch: dict[int, list[tuple[int, WriteSet, Answers[str]]]] = {}
    for epoch, txid, share, acks in queued:
        by_epoch.setdefault(epoch, []).append((txid, share, acks))
    return [
        (epoch, items[i : i + PREPARES_PER_MESSAGE_MAX])
        for epoch, items in by_epoch.items()
        for i in range(0, len(items), PREPARES_PER_MESSAGE_MAX)
    ]
PENDING = "PENDING"
"""A ``repl.prepare_many`` answer: that record was still being taken at the follower's cut-off."""


async def call_by(
    client: txrpc.Client, deadline: float, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], epoch: int
) -> Any:
    """``method(*args, **kwargs)`` at a peer, once, carrying ``epoch``; ``trio.TooSlowError``
    if no answer by ``deadline`` (trio clock; the peer is told to cancel). What
    ``fail_after`` around ``client.options(retries_max=0, metadata=...).call`` did,
    without building the options and without a cancel scope per call (the connection's
    one timer ends it: ``Client._call_once``)."""
    try:
        return await client._call_once(method, args, kwargs, {EPOCH_METADATA_KEY: epoch}, deadline)
    except DeadlinePassed:
        raise trio.TooSlowError from None


def _error_from_answer(answer: Any) -> txrpc.RpcError:
    """A ``repl.prepare_many`` answer that is not ``"ok"``: ``[code, message, details]``."""
    if isinstance(answer, list) and len(answer) == 3 and isinstance(answer[0], int):
        code, message, details = answer
        return txrpc.RpcError.from_wire(code, str(message), details if isinstance(details, dict) else {})
    return txrpc.Internal(f"unexpected answer {answer!r:.80}")
LOCK_WAIT_S_DEFAULT = 5.0


class Plan:
    """What each follower receives of one transaction: its share of the write set (the
    keys of partitions it replicates) and, for the written keys, the write locks."""

    __slots__ = ("by_follower", "epoch", "failures")

    def __init__(self, epoch: int, by_follower: dict[str, WriteSet]) -> None:
        self.epoch = epoch
        self.by_follower = by_follower
        self.failures: dict[str, str] = {}  # follower -> why it did not take the record


def plan(
    shard_map: ShardMap, node: str, writes: WriteSet, read_keys: Iterable[Any], *, scanned: bool = False
) -> Plan:
    """Which followers a transaction of ``node`` must reach at ``shard_map``'s epoch: the
    followers of every partition it wrote (with those writes) or read (to check the epoch:
    a stale read must not commit) -- every partition ``node`` is primary of, if it
    ``scanned`` (a scan reads the whole shard)."""
    by_follower: dict[str, WriteSet] = {}
    for key, deleted, value in writes:
        for follower in shard_map.followers_of(key):
            by_follower.setdefault(follower, []).append((key, deleted, value))
    for key in read_keys:
        if isinstance(key, str):
            for follower in shard_map.followers_of(key):
                by_follower.setdefault(follower, [])
    if scanned:
        for members in shard_map.replica_sets:
            if members[0] == node:
                for follower in members[1:]:
                    by_follower.setdefault(follower, [])
    by_follower.pop(node, None)
    return Plan(shard_map.epoch, by_follower)


class Replication:
    """The replication side of one node's participant (primary and follower roles)."""

    def __init__(
        self,
        node: str,
        guard: EpochGuard,
        client_for: ClientFor,
        *,
        map_source: Callable[[], Awaitable[ShardMap]] | None = None,
        timeout_s: float = REPLICATION_TIMEOUT_S_DEFAULT,
        lock_wait_s: float = LOCK_WAIT_S_DEFAULT,
    ) -> None:
        self.node = node
        self.guard = guard
        self.client_for = client_for
        self.map_source = map_source
        self.timeout_s = timeout_s
        self.lock_wait_s = lock_wait_s
        self.participant: Participant | None = None
        self._nursery: trio.Nursery | None = None
        self._notices: dict[str, list[int]] = {}  # follower -> commit notices not sent yet
        # Prepare records per follower, sent in rounds of repl.prepare_many (one round in
        # flight per follower: _queue_prepare).
        self._prepares: Rounds[_Queued, tuple[int, list[tuple[int, WriteSet, Answers[str]]]]] = Rounds(
            _prepare_messages, self._send_prepare_batch, self._refuse_prepares
        )
        self._flushing: set[str] = set()
        # Followers that refused commit notices riding on repl.prepare_many (an older
        # version), with when they refused (trio clock): none ride for NO_RIDERS_RETRY_S.
        self._no_riders: dict[str, float] = {}
        self._alarms = Alarms()  # bounds each send_prepare's wait for its acknowledgements
        self._lock_changed = trio.Event()
        self.stats = {
            "prepares_sent": 0, "prepares_received": 0, "refused": 0, "snapshot_rows": 0,
            "notices_sent": 0, "notices_riding": 0, "prepare_messages": 0,
        }  # fmt: skip
        self.installed_at = trio.current_time()  # when the current epoch's map was installed
        # Catch-up: partitions being copied from their primaries, and the keys replicated
        # commits wrote meanwhile (a snapshot row never overwrites those: they are newer).
        self.resyncing: set[int] = set()
        self.touched: set[str] = set()
        # Follower side: the slot of each primary's records (see ORIGIN_SLOTS), and the
        # slots of records recovered from disk.
        self._origin_slots: dict[str, int] = {}
        self._recovered_slots: set[int] = set()
        self._slots_sorted: tuple[int, ...] = ()  # _slots_in_use(), sorted (kept as they change)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that background sends (:meth:`send_outcome_soon`) run in."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._alarms.run)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def send_outcome_soon(self, txid: int, followers: list[str], outcome: str) -> None:
        """:meth:`send_outcome` without waiting for the answers (when :meth:`run` runs).

        Used for commits: a follower that never hears it still holds the record and its
        locks and resolves it by the termination protocol, and a later conflicting
        record waits for it there, so the primary need not wait."""
        if self._nursery is None or outcome != "commit":
            await self.send_outcome(txid, followers, outcome)
            return
        # Commit notices are coalesced per follower: they wait NOTICE_WAIT_S for prepare
        # records to that follower to ride on; those left then go as one `repl.commit_many`
        # (one in flight per follower at a time, carrying every notice queued meanwhile:
        # fewer messages, and one group-committed write batch at the follower).
        for follower in followers:
            if follower == self.node:
                continue
            self._notices.setdefault(follower, []).append(txid)
            if follower not in self._flushing:
                self._flushing.add(follower)
                self._nursery.start_soon(self._flush_notices, follower)

    async def _flush_notices(self, follower: str) -> None:
        try:
            while True:
                # Wait a little first: prepare records leaving for this follower meanwhile
                # take the notices along (_prepare_batch), and no message of their own goes.
                if self._alarms.running:
                    waited = trio.Event()
                    self._alarms.set_at(trio.current_time() + NOTICE_WAIT_S, waited)
                    await waited.wait()
                else:
                    await trio.sleep(NOTICE_WAIT_S)
                batch = self._notices.pop(follower, None)
                if not batch:
                    return
                for start in range(0, len(batch), NOTICES_PER_MESSAGE_MAX):
                    part = batch[start : start + NOTICES_PER_MESSAGE_MAX]
                    self.stats["notices_sent"] += len(part)
                    try:
                        client = await self.client_for(follower)
                        deadline = trio.current_time() + self.timeout_s
                        await call_by(client, deadline, "repl.commit_many", (part,), {}, self.guard.epoch)
                    except (txrpc.RpcError, trio.TooSlowError, OSError) as exc:
                        # It resolves those records itself (termination protocol).
                        log.info("node %s: %d commit notices not acknowledged by %s (%s)",
                                 self.node, len(part), follower, exc)  # fmt: skip
        finally:
            self._flushing.discard(follower)

    # --- primary side ----------------------------------------------------------------------

    def owns(self, keys: Iterable[Any]) -> bool:
        """Is this node the primary of every key (at its current epoch)?"""
        shard_map = self.guard.shard_map
        return all(not isinstance(k, str) or shard_map.primary_of(k).name == self.node for k in keys)

    async def send_prepare(
        self, txid: int, writes: WriteSet, read_keys: Iterable[Any], *, scanned: bool = False
    ) -> Plan:
        """Send the prepare record to every follower concerned (see :func:`plan`); returns
        the plan, whose ``failures`` name the followers that did *not* acknowledge it,
        with why (empty: all have it durable).

        Records for one follower queued in one scheduler round leave together in one
        ``repl.prepare_many`` (:meth:`_queue_prepare`): under load a primary prepares
        many transactions at once (the coordinator's ``tx.prepare_many``)."""
        (the_plan,) = await self.send_prepares([(txid, writes, read_keys, scanned)])
        return the_plan

    async def send_prepares(self, records: Sequence[tuple[int, WriteSet, Iterable[Any], bool]]) -> list[Plan]:
        """:meth:`send_prepare` for several ``(txid, writes, read_keys, scanned)`` at once,
        with one wait (bounded by ``timeout_s``) for all their acknowledgements."""
        plans = []
        countdown = Countdown()
        waits: list[tuple[Plan, Answers[str]]] = []
        shard_map = self.guard.shard_map
        for txid, writes, read_keys, scanned in records:
            the_plan = plan(shard_map, self.node, writes, read_keys, scanned=scanned)
            plans.append(the_plan)
            if not the_plan.by_follower:
                continue
            self.stats["prepares_sent"] += len(the_plan.by_follower)
            acks = Answers[str](len(the_plan.by_follower), countdown)
            waits.append((the_plan, acks))
            for follower, share in the_plan.by_follower.items():
                self._queue_prepare(follower, the_plan.epoch, txid, share, acks)
        if not waits:
            return plans
        countdown.tick()  # everything is queued
        if self._alarms.running:  # (a cancel scope per prepared transaction cost ~2 % of a node's CPU)
            self._alarms.set_at(trio.current_time() + self.timeout_s, countdown.done)
            await countdown.done.wait()
        else:
            with trio.move_on_after(self.timeout_s):
                await countdown.done.wait()
        for the_plan, acks in waits:
            failures = {f: why for f, why in acks.answers.items() if why}
            for follower in the_plan.by_follower:
                if follower not in acks.answers:
                    failures[follower] = f"no answer within {self.timeout_s:g} s"
            the_plan.failures = failures
        return plans

    def _queue_prepare(self, follower: str, epoch: int, txid: int, share: WriteSet, acks: Answers[str]) -> None:
        """Queue a record for ``follower``. Every record queued before its sender task runs
        goes in the same round; one round per follower is in flight at a time
        (:class:`Rounds`): with none, the sender runs in this scheduler round, and while
        one is unanswered the records queue and leave together once its answer arrives
        (not its ``PENDING`` resends): batches grow with the load."""
        if self._nursery is None or self._nursery.cancel_scope.cancel_called:
            acks.put(follower, f"node {self.node} is stopping")
            return
        self._prepares.put(self._nursery, follower, (epoch, txid, share, acks))

    def _refuse_prepares(self, follower: str, queued: list[_Queued]) -> None:
        for _, _, _, acks in queued:
            acks.put(follower, f"node {self.node} is stopping")

    async def _send_prepare_batch(
        self, follower: str, batch: tuple[int, list[tuple[int, WriteSet, Answers[str]]]], answered: Callable[[], None]
    ) -> None:
        await self._prepare_batch(follower, batch[0], batch[1], answered)

    async def _prepare_batch(
        self, follower: str, epoch: int, items: list[tuple[int, WriteSet, Answers[str]]], answered: Callable[[], None]
    ) -> None:
        """One ``repl.prepare_many``; every record gets an answer from it, whatever happens
        here. A record answered ``PENDING`` (still being taken at the follower's cut-off)
        is sent again alone with ``repl.prepare``, which waits for it there; so is every
        record for a follower without ``repl.prepare_many`` (an older version).
        ``answered`` is called once, when the ``repl.prepare_many`` is answered or failed."""
        records = [[txid, [[k, d, v] for k, d, v in share]] for txid, share, _ in items]
        deadline = trio.current_time() + self.timeout_s
        origin = {"origin": self.node}
        # Commit notices queued for this follower ride along (one message fewer); the
        # follower applies them in the background, as it would a repl.commit_many.
        riders = self._take_riders(follower)
        self.stats["prepare_messages"] += 1
        told = [False]

        def tell() -> None:
            if not told[0]:
                told[0] = True
                answered()

        try:
            client = await self.client_for(follower)
            try:
                kwargs = {**origin, "commits": riders} if riders else origin
                try:
                    answers = await call_by(client, deadline, "repl.prepare_many", (records,), kwargs, epoch)
                except txrpc.InvalidArgument as exc:
                    if not riders or "commits" not in exc.message:
                        raise
                    # An older follower (no riders): the notices go their own way.
                    self._no_riders[follower] = trio.current_time()
                    self._return_riders(follower, riders)
                    riders = []
                    answers = await call_by(client, deadline, "repl.prepare_many", (records,), origin, epoch)
            except txrpc.Unimplemented:
                self._return_riders(follower, riders)
                riders = []
                answers = [PENDING] * len(records)
            tell()
            if not isinstance(answers, list) or len(answers) != len(items):
                raise txrpc.Internal(f"{follower} answered repl.prepare_many with {answers!r:.80}")

            async def alone(index: int) -> None:
                txid, writes = records[index]
                try:
                    answers[index] = await call_by(client, deadline, "repl.prepare", (txid, writes), origin, epoch)
                except txrpc.RpcError as exc:
                    answers[index] = [int(exc.code), exc.message, dict(exc.details)]
                except trio.TooSlowError:  # (not raised out of run_all's nursery: no error group)
                    answers[index] = [int(txrpc.Code.DEADLINE_EXCEEDED), f"no answer within {self.timeout_s:g} s", {}]

            again = [i for i, answer in enumerate(answers) if answer == PENDING]
            if again:
                await run_all([functools.partial(alone, i) for i in again])
            learned = False
            for (_, _, acks), answer in zip(items, answers, strict=True):
                if answer == "ok":
                    acks.put(follower, "")
                    continue
                error = _error_from_answer(answer)
                if isinstance(error, txrpc.WrongEpoch):
                    acks.put(follower, f"fenced: {error.message}")
                    if not learned:
                        learned = True
                        await self._learn(error)
                else:
                    acks.put(follower, str(error) or type(error).__name__)
        except txrpc.WrongEpoch as exc:
            for _, _, acks in items:
                acks.put(follower, f"fenced: {exc.message}")
            await self._learn(exc)
        except (txrpc.RpcError, trio.TooSlowError, OSError) as exc:
            for _, _, acks in items:
                acks.put(follower, str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("node %s: replicated prepares of %d records to %s failed", self.node, len(items), follower)
            for _, _, acks in items:
                acks.put(follower, f"{type(exc).__name__}: {exc}")
        finally:
            tell()
            for _, _, acks in items:  # (cancelled: the node is stopping)
                acks.put(follower, f"node {self.node} is stopping")

    def _take_riders(self, follower: str) -> list[int]:
        """The commit notices queued for ``follower`` (at most NOTICES_PER_MESSAGE_MAX),
        to ride on a ``repl.prepare_many``; the rest stay queued."""
        queued = self._notices.get(follower)
        if not queued:
            return []
        refused_at = self._no_riders.get(follower)
        if refused_at is not None:
            if trio.current_time() - refused_at < NO_RIDERS_RETRY_S:
                return []
            del self._no_riders[follower]  # upgraded meanwhile? Try again.
        riders = queued[:NOTICES_PER_MESSAGE_MAX]
        del queued[:NOTICES_PER_MESSAGE_MAX]
        if not queued:
            del self._notices[follower]
        self.stats["notices_riding"] += len(riders)
        return riders

    def _return_riders(self, follower: str, riders: list[int]) -> None:
        """Notices a follower did not take along: queued again, to go on their own."""
        if riders and self._nursery is not None:
            self.stats["notices_riding"] -= len(riders)
            self._notices[follower] = riders + self._notices.get(follower, [])
            if follower not in self._flushing:
                self._flushing.add(follower)
                self._nursery.start_soon(self._flush_notices, follower)

    async def send_outcome(self, txid: int, followers: Iterable[str], outcome: str) -> dict[str, str]:
        """Tell ``followers`` the outcome (``"commit"``/``"abort"``); returns who did not
        acknowledge (they resolve it themselves by the termination protocol)."""
        failures: dict[str, str] = {}
        epoch = self.guard.epoch

        async def send(follower: str) -> None:
            try:
                client = await self.client_for(follower)
                await call_by(client, trio.current_time() + self.timeout_s, f"repl.{outcome}", (txid,), {}, epoch)
            except (txrpc.RpcError, trio.TooSlowError, OSError) as exc:
                failures[follower] = str(exc) or type(exc).__name__

        async with trio.open_nursery() as nursery:
            for follower in followers:
                if follower != self.node:
                    nursery.start_soon(send, follower)
        for follower, why in failures.items():
            log.info("node %s: %s of %d not acknowledged by %s (%s)", self.node, outcome, txid, follower, why)
        return failures

    def origin_index(self, origin: str) -> int:
        """The slot of records from primary ``origin`` (see :data:`ORIGIN_SLOTS`)."""
        slot = self._origin_slots.get(origin)
        if slot is not None:
            return slot
        if origin not in self.guard.shard_map:
            raise txrpc.FailedPrecondition(f"no node named {origin!r} in the shard map at epoch {self.guard.epoch}")
        used = self._slots_in_use()
        slot = next((i for i in range(ORIGIN_SLOTS) if i not in used), None)
        if slot is None:
            raise txrpc.FailedPrecondition(f"replication supports at most {ORIGIN_SLOTS} primaries per follower")
        self._origin_slots[origin] = slot
        self._slots_sorted = tuple(sorted(self._slots_in_use()))
        return slot

    def restore_origin(self, record: int, origin: str | None) -> None:
        """Recovery: a replicated record found on disk keeps its slot (for ``origin``,
        when its meta names it and no other primary has that slot yet)."""
        slot = (-record) % ORIGIN_SLOTS
        self._recovered_slots.add(slot)
        if origin and origin not in self._origin_slots and slot not in self._origin_slots.values():
            self._origin_slots[origin] = slot
        self._slots_sorted = tuple(sorted(self._slots_in_use()))

    def _slots_in_use(self) -> set[int]:
        return set(self._origin_slots.values()) | self._recovered_slots

    def records_of(self, txid: int) -> list[int]:
        """The replicated records of ``txid`` this node holds (from any primary)."""
        assert self.participant is not None
        txs = self.participant.core.txs
        return [rid for i in self._slots_sorted if (rid := record_id(txid, i)) in txs]

    def followers_of_tx(self, writes: WriteSet, read_keys: Iterable[Any] = ()) -> list[str]:
        return sorted(plan(self.guard.shard_map, self.node, writes, read_keys).by_follower)

    async def _learn(self, error: txrpc.WrongEpoch) -> None:
        offered = error.details.get("shard_map")
        if offered is not None:
            try:
                self.install(ShardMap.from_wire(offered))
            except (ValueError, TypeError) as exc:
                log.warning("node %s: a WRONG_EPOCH carried an unusable map: %s", self.node, exc)

    def install(self, shard_map: ShardMap, *, authoritative: bool = False) -> bool:
        try:
            adopted = self.guard.install(shard_map)
        except ValueError as exc:
            # Same epoch, different map. Only addresses differ (the authority's file names
            # a proxy in between, say): keep ours. The placement differs and this map is
            # the authority's (this node's file listed nodes not added yet): adopt it.
            if not authoritative or shard_map.same_placement(self.guard.shard_map):
                log.warning("node %s: %s; keeping this node's map", self.node, exc)
                return False
            log.warning("node %s: adopting the authority's map at epoch %d", self.node, shard_map.epoch)
            self.guard.replace(shard_map)
            adopted = True
        if adopted:
            self.installed_at = trio.current_time()
            log.info("node %s: shard map epoch %d installed", self.node, shard_map.epoch)
            self.locks_changed()
        return adopted

    async def refresh(self) -> None:
        if self.map_source is not None:
            with trio.move_on_after(self.timeout_s):
                try:
                    self.install(await self.map_source(), authoritative=True)
                except (txrpc.RpcError, OSError) as exc:
                    log.info("node %s: shard map not refreshed: %s", self.node, exc)

    # --- follower side ---------------------------------------------------------------------

    def locks_changed(self) -> None:
        self._lock_changed.set()
        self._lock_changed = trio.Event()

    async def follow_call_epoch(self) -> int | None:
        """The epoch the call being served carries (None if it carries none); when it
        is newer than this node's, the map is fetched from the authority first."""
        call_epoch = txrpc.current_call().metadata.get(EPOCH_METADATA_KEY)
        if type(call_epoch) is not int:
            return None
        if call_epoch > self.guard.epoch:
            await self.refresh()
        return call_epoch

    async def fence(self, origin: str, keys: Iterable[Any]) -> None:
        """Refuse the replication call being served unless it comes from the primary of
        ``keys`` at this follower's epoch (see the module docstring)."""
        if _env.broken("replication.follower_ignores_epoch"):
            return  # test-only broken protocol (simulator): no fencing
        self.check_fence(origin, await self.follow_call_epoch(), keys)

    def check_fence(self, origin: str, call_epoch: int | None, keys: Iterable[Any], *, count: bool = True) -> None:
        """:meth:`fence` once the call's epoch is known (and followed, if newer); a refusal
        counts in ``stats["refused"]`` unless ``count`` is False (a caller that asks again)."""
        if _env.broken("replication.follower_ignores_epoch"):
            return  # test-only broken protocol (simulator): no fencing
        if call_epoch is None:
            raise txrpc.InvalidArgument("replication calls carry the sender's epoch in metadata 'epoch'")
        if call_epoch > self.guard.epoch:
            raise txrpc.Unavailable(
                f"follower {self.node} is at epoch {self.guard.epoch}, behind the sender's {call_epoch}; "
                "it could not fetch the newer map yet",
                {"not_started": True},
            )
        shard_map = self.guard.shard_map
        if call_epoch < shard_map.epoch:
            self.stats["refused"] += count
            raise txrpc.WrongEpoch(
                f"replication from {origin} at epoch {call_epoch}; follower {self.node} is at epoch "
                f"{shard_map.epoch} (the sender was deposed or is behind)",
                details={"shard_map": shard_map.to_wire(), "epoch": shard_map.epoch, "call_epoch": call_epoch},
            )
        for key in keys:
            members = shard_map.replicas_of(key)
            if members[0] != origin or self.node not in members[1:]:
                self.stats["refused"] += count
                raise txrpc.FailedPrecondition(
                    f"at epoch {shard_map.epoch}, {origin} is not the primary of {key!r} with {self.node} "
                    f"as a follower (replicas: {list(members)})"
                )

    def conflicts(self, txid: int, locks: list[tuple[Any, Mode]]) -> bool:
        """Does another transaction hold a lock that conflicts with ``locks``?"""
        assert self.participant is not None
        return self.participant.core.locks.conflicts(txid, locks)

    async def wait_for_locks(self, txid: int, locks: list[tuple[Any, Mode]], until: float = math.inf) -> None:
        """Wait (bounded by ``lock_wait_s`` and by ``until``, trio clock) until no other
        transaction holds a lock that conflicts with ``locks``: replicated prepare records
        are applied in the order their primary serialized them, because a conflicting
        later one waits here for the earlier one's outcome."""
        if not self.conflicts(txid, locks):
            return
        with trio.move_on_at(min(trio.current_time() + self.lock_wait_s, until)) as scope:
            while self.conflicts(txid, locks):
                await self._lock_changed.wait()
            return
        if scope.cancelled_caught:
            raise txrpc.Unavailable(
                f"follower {self.node}: transaction {txid} waits for an earlier transaction's outcome on its keys",
                {"not_started": True},
            )


class PeerClients:
    """Clients to the other nodes, opened on first use and held until :meth:`run` is
    cancelled."""

    def __init__(
        self,
        shard_map: ShardMap,
        credentials: txrpc.Credentials | None = None,
        current_map: Callable[[], ShardMap] | None = None,
    ) -> None:
        """Addresses come from ``shard_map`` (this node's file), else from
        ``current_map()`` (for nodes added to the cluster since)."""
        self.addresses = {node.name: node.address for node in shard_map.nodes}
        self.current_map = current_map
        self.credentials = credentials
        self._clients: dict[str, txrpc.Client] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def get(self, name: str) -> txrpc.Client:
        client = self._clients.get(name)
        if client is not None:
            return client
        if self._nursery is None:
            raise RuntimeError("PeerClients.run is not running")
        address = self.addresses.get(name)
        if address is None and self.current_map is not None and name in self.current_map():
            address = self.current_map().node(name).address
        if address is None:
            raise txrpc.FailedPrecondition(f"no node named {name!r} in the shard map")
        new = txrpc.connect(
            *address, connect_now=False, credentials=self.credentials, limits=txrpc.Limits(retries_max=0)
        )
        client = await self._nursery.start(_hold, new)
        # Another task may have opened one meanwhile: keep the first.
        return self._clients.setdefault(name, client)


async def _hold(client: txrpc.Client, *, task_status: trio.TaskStatus[txrpc.Client] = trio.TASK_STATUS_IGNORED) -> None:
    async with client:
        task_status.started(client)
        await trio.sleep_forever()
