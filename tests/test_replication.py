"""Replicated shards (R=3 on 3 nodes, in-process over loopback TCP, SQLite): synchronous
replication of prepare and commit records, equal digests, failover by the authority,
fencing of a deposed primary, and in-doubt transactions inherited by a new primary."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from _cluster_helpers import LocalCluster, deposits_at, free_ports, load_bank_service, local_cluster

import txrpc

bank = load_bank_service()
T = TypeVar("T")

audit = txrpc.Service("audit")


@audit.transactional
async def scan_sum(tx: Any, key: str, prefix: str) -> int:
    """The sum of every balance under ``prefix`` on ``key``'s shard (a scan: no key locks)."""
    return sum(int(value) for _, value in await tx.scan(prefix))


def accounts(cfg: txrpc.ClusterConfig, per_node: int) -> list[str]:
    names: list[str] = []
    by_node: dict[str, int] = {}
    i = 0
    while len(names) < per_node * len(cfg.shard_map.nodes):
        name = f"acct{i}"
        i += 1
        node = cfg.shard_map.primary_of(name).name
        if by_node.get(node, 0) < per_node:
            by_node[node] = by_node.get(node, 0) + 1
            names.append(name)
    return names


async def digests(local: LocalCluster) -> dict[str, dict[int, Any]]:
    out = {}
    for name, participant in local.participants.items():
        reply = await participant._repl_digests()
        out[name] = {p: (rows, digest) for p, rows, digest in reply["partitions"]}
    return out


async def differences(local: LocalCluster) -> list[str]:
    shard_map = next(iter(local.participants.values())).replication.guard.shard_map  # type: ignore[union-attr]
    by_node = await digests(local)
    found = []
    for partition, members in enumerate(shard_map.replica_sets):
        live = [m for m in members if m in by_node]
        seen = {m: tuple(by_node[m].get(partition, (0, ""))) for m in live}
        if len(set(seen.values())) > 1:
            found.append(f"partition {partition}: {seen}")
    return found


async def assert_replicas_equal(local: LocalCluster, timeout_s: float = 15.0) -> None:
    """Once nothing is in doubt, every live replica of every partition holds the same
    committed state. (Phase 2 runs after the client hears "committed": a follower may
    apply the last commits a moment later, so this waits, bounded, for quiescence.)"""
    with trio.move_on_after(timeout_s):
        while True:
            in_doubt = sum(len(p.core.in_doubt()) for p in local.participants.values())
            if in_doubt == 0 and not await differences(local):
                return
            await trio.sleep(0.1)
    in_doubt = {n: p.core.in_doubt() for n, p in local.participants.items()}
    raise AssertionError(f"replicas differ after {timeout_s} s: {await differences(local)}; in doubt: {in_doubt}")


async def transfers(cluster: txrpc.Cluster, names: list[str], count: int, seed: int) -> int:
    rng = random.Random(seed)
    done = 0
    for _ in range(count):
        a, b = rng.sample(names, 2)
        try:
            async def body(t: Any, a: str = a, b: str = b) -> None:
                await t.bank.withdraw(a, 1)
                await t.bank.deposit(b, 1)

            await cluster.run_transaction(body)
            done += 1
        except txrpc.TransactionAborted:
            pass
    return done


async def during_transfers(
    cluster: txrpc.Cluster, names: list[str], seed: int, change: Callable[[], Awaitable[T]]
) -> tuple[T, int]:
    """Run ``change()`` while transfers commit one after another (from a little before
    to a little after it); its result and how many transfers committed."""
    stop = trio.Event()
    moved = 0

    async def workload() -> None:
        nonlocal moved
        next_seed = seed
        while not stop.is_set():
            moved += await transfers(cluster, names, 1, seed=next_seed)
            next_seed += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(workload)
        await trio.sleep(0.25)
        result = await change()
        await trio.sleep(0.25)
        stop.set()
    return result, moved


async def open_accounts(cluster: txrpc.Cluster, names: list[str], balance: int = 100) -> None:
    for name in names:
        async with cluster.transaction() as t:  # single-shard: coordinator-decided when replicated
            await t.bank.open_account(name, balance)


async def total(cluster: txrpc.Cluster, names: list[str]) -> int:
    return sum([await cluster.call(n, "bank.balance", n) for n in names])


async def explain(local: LocalCluster) -> str:
    """For a failed conservation check: where a key's value in a commit log does not
    follow from the one before it (every transfer moves 1)."""
    lines = []
    for name, participant in local.participants.items():
        last: dict[str, tuple[Any, int, int]] = {}
        for position, txid, writes in await participant.store.log_entries(0, 100_000):
            for key, _, value in writes:
                if key in last and txid != 0 and abs(value - last[key][0]) != 1:
                    lines.append(f"{name} {key}: {last[key]} -> {(value, txid, position)}")
                last[key] = (value, txid, position)
    return "\n".join(lines) or "no jump in any commit log"


async def test_replicated_transfers_leave_every_replica_equal(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        assert await transfers(cluster, names, 30, seed=1) > 0
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)
        # Every node holds every account (R = 3 of 3 nodes), the followers included.
        for participant in local.participants.values():
            held = await participant.store.items()
            assert sorted(k for k in held if k.startswith("acct")) == sorted(names)
        assert sum(p.replication.stats["prepares_received"] for p in local.participants.values()) > 0  # type: ignore[union-attr]


async def test_replicated_prepares_are_batched_per_follower(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepare records a primary sends in one scheduler round reach a follower as one
    repl.prepare_many (fewer messages than records); every record is taken once and
    every replica ends equal."""
    from coordinator import Participant

    sizes: list[int] = []
    real = Participant._repl_prepare_many

    async def counting(self: Participant, records: list[Any], origin: str = "", commits: Any = None) -> list[Any]:
        sizes.append(len(records))
        return await real(self, records, origin, commits)

    monkeypatch.setattr(Participant, "_repl_prepare_many", counting)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 8)
        await open_accounts(cluster, names)
        sizes.clear()
        received = sum(p.replication.stats["prepares_received"] for p in local.participants.values())  # type: ignore[union-attr]
        pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(0, len(names), 2)]

        async def along(src: str, dst: str) -> None:
            for _ in range(5):
                async def body(t: Any) -> None:
                    await t.bank.withdraw(src, 1)
                    await t.bank.deposit(dst, 1)

                await cluster.run_transaction(body, attempts=50)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for src, dst in pairs:
                    nursery.start_soon(along, src, dst)
        received = sum(p.replication.stats["prepares_received"] for p in local.participants.values()) - received  # type: ignore[union-attr]
        assert sum(sizes) == received > 0
        assert max(sizes) > 1 and len(sizes) < sum(sizes)
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)


async def test_one_prepare_message_per_follower_is_in_flight_the_rest_queue_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary has at most one repl.prepare_many unanswered per follower: records for
    that follower queued meanwhile leave together when it answers. Every record is still
    taken once and every replica ends equal."""
    from coordinator import Participant

    in_flight: dict[tuple[str, str], int] = {}
    most: dict[tuple[str, str], int] = {}
    sizes: list[int] = []
    real = Participant._repl_prepare_many

    async def slow(self: Participant, records: list[Any], origin: str = "", commits: Any = None) -> list[Any]:
        pair = (origin, self.shard)
        in_flight[pair] = in_flight.get(pair, 0) + 1
        most[pair] = max(most.get(pair, 0), in_flight[pair])
        sizes.append(len(records))
        try:
            await trio.sleep(0.02)  # records queued meanwhile for this follower must wait
            return await real(self, records, origin, commits)
        finally:
            in_flight[pair] -= 1

    monkeypatch.setattr(Participant, "_repl_prepare_many", slow)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 8)
        await open_accounts(cluster, names)
        sizes.clear()
        most.clear()
        sent = sum(p.replication.stats["prepare_messages"] for p in local.participants.values())  # type: ignore[union-attr]
        pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(0, len(names), 2)]

        async def along(src: str, dst: str) -> None:
            for _ in range(5):
                async def body(t: Any) -> None:
                    await t.bank.withdraw(src, 1)
                    await t.bank.deposit(dst, 1)

                await cluster.run_transaction(body, attempts=50)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for src, dst in pairs:
                    nursery.start_soon(along, src, dst)
        assert most and set(most.values()) == {1}, most
        sent = sum(p.replication.stats["prepare_messages"] for p in local.participants.values()) - sent  # type: ignore[union-attr]
        assert sent == len(sizes)  # tx.status counts the messages a primary sent
        assert max(sizes) > 2 and len(sizes) < sum(sizes)
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)


async def test_repl_prepare_many_answers_each_record(tmp_path: Path) -> None:
    """repl.prepare_many: each record taken as by repl.prepare and answered on its own
    ("ok", or [code, message, details]); a stale epoch fences every record with this
    node's map; a malformed batch is refused whole; nothing is left in doubt."""
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 1)
        await open_accounts(cluster, names)
        shard_map = local.config.shard_map
        primary = shard_map.primary_of(names[0]).name
        follower = next(n.name for n in shard_map.nodes if n.name != primary)
        async with txrpc.connect(*shard_map.node(follower).address) as client:
            current = client.options(metadata={"epoch": shard_map.epoch})
            txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
            answers = await current.call(
                "repl.prepare_many", [[txid, [[names[0], False, 7]]], [-5, []]], origin=primary
            )
            assert answers[0] == "ok"
            assert answers[1][0] == int(txrpc.Code.INVALID_ARGUMENT) and "positive integer" in answers[1][1]
            assert await current.call("repl.abort", txid) == "ok"
            stale = client.options(metadata={"epoch": shard_map.epoch - 1})
            records = [[txid + 1, [[names[0], False, 7]]], [txid + 2, [[names[0], False, 8]]]]
            stats = local.participants[follower].replication.stats  # type: ignore[union-attr]
            refused = stats["refused"]
            fenced = await stale.call("repl.prepare_many", records, origin=primary)
            assert [a[0] for a in fenced] == [int(txrpc.Code.WRONG_EPOCH)] * 2
            assert stats["refused"] == refused + 2  # once per record
            assert sum("shard_map" in a[2] for a in fenced) == 1  # the map once per answer, not per record
            for bad in ([], [[1]], [[1, "writes"]], "x", [[1, []]] * 2000):
                with pytest.raises(txrpc.InvalidArgument):
                    await current.call("repl.prepare_many", bad, origin=primary)
        with trio.fail_after(5):  # (the accounts' own commit notices wait NOTICE_WAIT_S to ride)
            while local.participants[follower].core.in_doubt():
                await trio.sleep(0.01)
        assert await cluster.call(names[0], "bank.balance", names[0]) == 100


async def test_a_followers_batch_is_written_together_and_the_rest_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """repl.prepare_many writes every new, unconflicting record of a batch as one queued
    write (one wait), and repl.commit_many applies every ready record as one; a record
    that conflicts with one of them (a lock wait) or is malformed goes on its own: the
    wait is answered PENDING at the cut-off and finishes once the lock is free."""
    groups = _count_follower_writes(monkeypatch)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        primary = shard_map.nodes[0].name
        k1, k2 = [n for n in (f"acct{i}" for i in range(5000)) if shard_map.primary_of(n).name == primary][:2]
        follower = shard_map.nodes[1].name
        for counts in groups.values():
            counts.clear()
        async with txrpc.connect(*shard_map.node(follower).address) as client:
            current = client.options(metadata={"epoch": shard_map.epoch})
            a, b, d = [(await cluster.coordinator.call("coord.begin", None))["txid"] for _ in range(3)]
            records = [[a, [[k1, False, 7]]], [b, [[k1, False, 8]]], [-5, []], [d, [[k2, False, 9]]]]
            answers = await current.call("repl.prepare_many", records, origin=primary)
            assert answers[0] == "ok" and answers[3] == "ok"
            assert answers[1] == "PENDING"  # it waits for a's lock, in the background
            assert answers[2][0] == int(txrpc.Code.INVALID_ARGUMENT)
            assert groups["prepares"] == [2] and groups["prepare"] == []  # a and d: one write
            assert await current.call("repl.commit_many", [a, d]) == 2
            assert groups["commits"] == [2]
            assert await current.call("repl.prepare", b, [[k1, False, 8]], origin=primary) == "ok"  # asked alone
            assert groups["prepare"] == [1]  # b: its own write, once a's lock was free
            assert await current.call("repl.commit_many", [b, b]) == 1  # a duplicate applies nothing
            # At most GROUP_RECORDS_MAX records go together; the rest of the batch one by one.
            keys = [n for n in (f"acct{i}" for i in range(5000)) if shard_map.primary_of(n).name == primary][2:302]
            txids = list(range(10**9, 10**9 + len(keys)))
            before = len(groups["prepares"])
            records = [[txid, [[key, False, 1]]] for txid, key in zip(txids, keys, strict=True)]
            answers = await current.call("repl.prepare_many", records, origin=primary)
            assert set(answers) <= {"ok", "PENDING"}
            with trio.fail_after(10):
                while sum(groups["prepares"][before:]) < len(keys):
                    await trio.sleep(0.05)
            assert sorted(groups["prepares"][before:]) == [1] * (len(keys) - 256) + [256]
            for txid in txids:
                await current.call("repl.abort", txid)
        store = local.participants[follower].store
        assert await store.get(k1) == (True, 8) and await store.get(k2) == (True, 9)
        assert [rid for rid in local.participants[follower].core.txs if rid < 0] == []


async def test_a_second_notice_for_records_already_applied_costs_no_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction with two primaries leaves two records at a node that follows both;
    the first primary's notice applies both, and the second's (or a notice for a
    transaction this node never held) finds nothing: it is answered in the message's
    pass, without the one-by-one path (_repl_commit, a task each)."""
    from coordinator._participant import Participant

    singles: list[int] = []
    real_single = Participant._repl_commit

    async def repl_commit(self: Participant, txid: int) -> str:
        singles.append(txid)
        return await real_single(self, txid)

    monkeypatch.setattr(Participant, "_repl_commit", repl_commit)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        first, follower, second = (node.name for node in shard_map.nodes)
        names = (f"acct{i}" for i in range(5000))
        k1 = next(n for n in names if shard_map.primary_of(n).name == first)
        k2 = next(n for n in names if shard_map.primary_of(n).name == second)
        async with txrpc.connect(*shard_map.node(follower).address) as client:
            current = client.options(metadata={"epoch": shard_map.epoch})
            txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
            assert await current.call("repl.prepare_many", [[txid, [[k1, False, 5]]]], origin=first) == ["ok"]
            assert await current.call("repl.prepare_many", [[txid, [[k2, False, 6]]]], origin=second) == ["ok"]
            assert len(local.participants[follower].replication.records_of(txid)) == 2
            assert await current.call("repl.commit_many", [txid]) == 1  # both records, one write
            assert local.participants[follower].replication.records_of(txid) == []
            assert await current.call("repl.commit_many", [txid, 10**9]) == 0  # the second notice; a stranger
            assert singles == []
        store = local.participants[follower].store
        assert await store.get(k1) == (True, 5) and await store.get(k2) == (True, 6)


def test_at_most_512_commit_notices_ride_on_one_message_the_rest_stay_queued(tmp_path: Path) -> None:
    """A prepare message takes at most NOTICES_PER_MESSAGE_MAX (512) of the notices queued
    for its follower, oldest first; the rest stay queued, in order, for the next message or
    the flusher; a follower that refused riders gets none for NO_RIDERS_RETRY_S, then
    they are tried again (it may have been upgraded since)."""
    from _cluster_helpers import make_config

    from coordinator._replication import NO_RIDERS_RETRY_S, NOTICES_PER_MESSAGE_MAX, Replication
    from txrpc._routing import EpochGuard

    async def no_client(_: str) -> txrpc.Client:
        raise AssertionError("nothing is sent in this test")

    async def main() -> None:
        shard_map = make_config(tmp_path, 3, replication_factor=3).shard_map
        node, follower = shard_map.nodes[0].name, shard_map.nodes[1].name
        replication = Replication(node, EpochGuard(shard_map, node=node), no_client)
        assert NOTICES_PER_MESSAGE_MAX == 512
        replication._notices[follower] = list(range(1, 601))
        assert replication._take_riders(follower) == list(range(1, 513))
        assert replication._notices[follower] == list(range(513, 601))
        assert replication._take_riders(follower) == list(range(513, 601))
        assert follower not in replication._notices
        assert replication.stats["notices_riding"] == 600
        replication._notices[follower] = [7]
        replication._no_riders[follower] = trio.current_time()  # it refused riders just now
        assert replication._take_riders(follower) == []
        assert replication._notices[follower] == [7]
        clock.jump(NO_RIDERS_RETRY_S - 1)
        assert replication._take_riders(follower) == []
        clock.jump(1)
        assert replication._take_riders(follower) == [7]  # tried again
        assert follower not in replication._no_riders

    clock = trio.testing.MockClock()
    trio.run(main, clock=clock)


async def test_commit_notices_riding_on_prepare_records_are_applied_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """repl.prepare_many's ``commits`` are commit notices riding along: the follower
    applies them as repl.commit_many would, without the answer waiting for them; a
    record of the batch that conflicts with one of them waits for it (and is then
    taken). Malformed notices refuse the whole call, taking nothing."""
    groups = _count_follower_writes(monkeypatch)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        primary = shard_map.nodes[0].name
        k1, k2 = _primary_keys(shard_map, primary, 2)
        follower = shard_map.nodes[1].name
        store = local.participants[follower].store
        async with txrpc.connect(*shard_map.node(follower).address) as client:
            current = client.options(metadata={"epoch": shard_map.epoch})
            a, b, c = [(await cluster.coordinator.call("coord.begin", None))["txid"] for _ in range(3)]
            assert await current.call("repl.prepare_many", [[a, [[k1, False, 7]]]], origin=primary) == ["ok"]
            for counts in groups.values():
                counts.clear()
            with pytest.raises(txrpc.InvalidArgument):
                await current.call("repl.prepare_many", [[c, [[k2, False, 1]]]], origin=primary, commits=[a, -1])
            assert groups["prepares"] == [] and groups["commits"] == []  # nothing taken, nothing applied
            # b (on a's key) rides with a's commit notice: a is applied, then b is taken.
            answers = await current.call("repl.prepare_many", [[b, [[k1, False, 8]]]], origin=primary, commits=[a])
            assert answers == ["ok"]
            assert groups["commits"] == [1]  # a's notice: applied as one write
            assert await store.get(k1) == (True, 7)  # a is committed here; b is prepared
            # Notices alone (an empty ride) and duplicates apply nothing more.
            answers = await current.call("repl.prepare_many", [[c, [[k2, False, 9]]]], origin=primary, commits=[a])
            assert answers == ["ok"]
            assert await current.call("repl.commit_many", [b, c]) == 2
        assert await store.get(k1) == (True, 8) and await store.get(k2) == (True, 9)
        assert [rid for rid in local.participants[follower].core.txs if rid < 0] == []


async def test_a_record_whose_sender_gave_up_is_not_taken_later(tmp_path: Path) -> None:
    """A follower's record that waits for an earlier record's locks stops waiting at its
    call's deadline (repl.prepare has no cancel scope per call): once the primary has
    given up on it, taking it later would leave a record the primary never tells."""
    from coordinator._replication import txid_of

    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        primary, follower = shard_map.nodes[0].name, shard_map.nodes[1].name
        (k1,) = _primary_keys(shard_map, primary, 1)
        participant = local.participants[follower]
        async with txrpc.connect(*shard_map.node(follower).address) as client:
            current = client.options(metadata={"epoch": shard_map.epoch})
            a, b = [(await cluster.coordinator.call("coord.begin", None))["txid"] for _ in range(2)]
            assert await current.call("repl.prepare_many", [[a, [[k1, False, 7]]]], origin=primary) == ["ok"]
            with pytest.raises(trio.TooSlowError), trio.fail_after(0.3):
                await current.call("repl.prepare", b, [[k1, False, 8]], origin=primary)  # waits for a
            await trio.sleep(0.3)  # past b's deadline at the follower too
            assert await current.call("repl.commit_many", [a]) == 1  # a's locks go
            await trio.sleep(0.2)
            assert [rid for rid in participant.core.txs if txid_of(rid) == b] == []  # b was not taken late
        assert await participant.store.get(k1) == (True, 7)


async def test_primaries_send_commit_notices_along_with_prepare_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a transfer workload, commit notices queued for a follower leave with the
    next prepare records for it (fewer repl.commit_many messages); every replica ends
    equal."""
    from coordinator import Participant

    real = Participant._repl_prepare_many
    rode: list[int] = []

    async def counting(self: Participant, records: list[Any], origin: str = "", commits: Any = None) -> list[Any]:
        rode.extend(commits or [])
        return await real(self, records, origin, commits)

    monkeypatch.setattr(Participant, "_repl_prepare_many", counting)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 4)
        await open_accounts(cluster, names)
        async with trio.open_nursery() as nursery:
            for seed in range(8):
                nursery.start_soon(transfers, cluster, names, 15, seed)
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)
        stats = []  # each node's counters, as tx.status reports them
        for node in local.config.shard_map.nodes:
            async with txrpc.connect(*node.address) as client:
                stats.append((await client.call("tx.status"))["replication"])
        assert rode and sum(s["notices_riding"] for s in stats) == len(rode)


async def test_an_older_follower_gets_its_commit_notices_on_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower whose repl.prepare_many takes no ``commits`` (an older version:
    INVALID_ARGUMENT, unexpected keyword) gets the batch again without them, and its
    notices by repl.commit_many from then on; transfers commit, replicas end equal."""
    from coordinator import Participant

    real = Participant._repl_prepare_many

    async def older(self: Participant, records: list[Any], origin: str = "") -> list[Any]:
        return await real(self, records, origin)

    monkeypatch.setattr(Participant, "_repl_prepare_many", older)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 4)
        await open_accounts(cluster, names)
        replications = [p.replication for p in local.participants.values()]
        # A notice queued for every follower (of a transaction none of them holds: it
        # applies nothing), so the next prepare records for each take one along.
        unknown = (await cluster.coordinator.call("coord.begin", None))["txid"]
        for replication in replications:
            for node in local.config.shard_map.nodes:
                if node.name != replication.node:  # type: ignore[union-attr]
                    replication._notices[node.name] = [unknown]  # type: ignore[union-attr]
        async with trio.open_nursery() as nursery:
            for seed in range(4):
                nursery.start_soon(transfers, cluster, names, 10, seed)
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)
        assert any(r._no_riders for r in replications)  # type: ignore[union-attr]
        assert sum(r.stats["notices_riding"] for r in replications) == 0  # type: ignore[union-attr]
        assert sum(r.stats["notices_sent"] for r in replications) > 0  # type: ignore[union-attr]


def _count_follower_writes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Records per ShardStore.write_prepares call ("prepares"; write_prepare's one record
    counts there too), a 1 per write_prepare (the one-record path), and commits per
    ShardStore.apply_commits call ("commits")."""
    from storage._shard_store import ShardStore

    counts: dict[str, list[int]] = {"prepares": [], "prepare": [], "commits": []}
    real_prepares, real_prepare = ShardStore.write_prepares, ShardStore.write_prepare
    real_commits = ShardStore.apply_commits

    async def apply_commits(self: ShardStore, commits: Any) -> list[int]:
        counts["commits"].append(len(commits))
        return await real_commits(self, commits)

    monkeypatch.setattr(ShardStore, "apply_commits", apply_commits)

    async def write_prepares(self: ShardStore, records: Any) -> None:
        counts["prepares"].append(len(records))
        await real_prepares(self, records)

    async def write_prepare(self: ShardStore, *args: Any, **kwargs: Any) -> None:
        counts["prepare"].append(1)
        await real_prepare(self, *args, **kwargs)

    monkeypatch.setattr(ShardStore, "write_prepares", write_prepares)
    monkeypatch.setattr(ShardStore, "write_prepare", write_prepare)
    return counts


def _primary_keys(shard_map: Any, node: str, count: int) -> list[str]:
    """The first ``count`` account names whose primary is ``node``."""
    return [n for n in (f"acct{i}" for i in range(5000)) if shard_map.primary_of(n).name == node][:count]


async def test_a_replicated_primary_prepares_a_batch_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replicated primary takes a tx.prepare_many batch together: its own records in
    one queued write, the followers' copies sent meanwhile, one wait for all their
    acknowledgements. A record one follower refuses makes that transaction alone vote
    no: its record is dropped here, its locks freed, the others are prepared and commit.
    A read-only transaction of the batch votes as before (its reads fenced on its own)."""
    from coordinator import Participant
    from storage._shard_store import ShardStore

    primary_writes: list[list[int]] = []
    refuse: set[int] = set()
    real_rows, real_repl = ShardStore._prepare_rows, Participant._repl_prepare_many

    disk_full = [False]

    def prepare_rows(self: ShardStore, records: Any) -> Any:  # (each queued write of prepare records)
        own = [txid for txid, *_ in records if txid > 0]  # (a follower's copies have negative ids)
        if own:
            primary_writes.append(own)
            if disk_full[0]:
                raise OSError("disk full (test)")
        return real_rows(self, records)

    async def refusing(self: Participant, records: list[Any], origin: str = "", commits: Any = None) -> list[Any]:
        mine = [r for r in records if r[0] not in refuse]
        if not mine and commits:
            await self._repl_commit_many(commits)  # (the notices riding along still count)
        answers = iter(await real_repl(self, mine, origin, commits)) if mine else iter(())
        refused = [int(txrpc.Code.FAILED_PRECONDITION), "refused (test)", {}]
        return [refused if r[0] in refuse else next(answers) for r in records]

    monkeypatch.setattr(ShardStore, "_prepare_rows", prepare_rows)
    monkeypatch.setattr(Participant, "_repl_prepare_many", refusing)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.nodes[0]
        names = _primary_keys(shard_map, node.name, 5)
        await open_accounts(cluster, names, 10)
        participant = local.participants[node.name]
        async with txrpc.connect(*node.address) as shard:
            txids = await deposits_at(cluster, shard, names[:4], shard_map.epoch)
            reader = (await cluster.coordinator.call("coord.begin", None))["txid"]
            meta = {"txid": reader, "op_seq": 1, "epoch": shard_map.epoch}
            assert await shard.options(metadata=meta).call("bank.balance", names[4]) == 10
            refuse.add(txids[1])
            primary_writes.clear()
            answers = await shard.call("tx.prepare_many", [txids[0], txids[1], reader, txids[2], txids[3]])
            yes = {"vote": "yes", "reason": ""}
            assert answers[0] == answers[3] == answers[4] == yes, answers
            assert answers[1]["vote"] == "no" and "not on every replica" in answers[1]["reason"], answers[1]
            assert answers[2] == {"vote": "read_only", "reason": ""}
            assert primary_writes == [[txids[0], txids[1], txids[2], txids[3]]]  # one write for the four
            assert txids[1] not in participant.core.txs  # aborted here at once, its lock freed
            assert not participant.core.locks.held_by(txids[1])
            for follower in shard_map.replica_sets[shard_map.partition_of(names[0])][1:]:
                holds = local.participants[follower].replication.records_of  # type: ignore[union-attr]
                assert holds(txids[0]) and holds(txids[2]) and not holds(txids[1])
            ok = [txids[0], txids[2], txids[3]]
            assert await shard.call("tx.commit_many", ok) == ["ok", "ok", "ok"]
            assert await shard.call("tx.abort", txids[1]) == "ok"
            # The primary's own write fails: every transaction of the batch votes no, the
            # followers that took their copies are told to abort, nothing stays held.
            again = await deposits_at(cluster, shard, names[:2], shard_map.epoch, 5)
            refuse.clear()
            disk_full[0] = True
            answers = await shard.call("tx.prepare_many", again)
            disk_full[0] = False
            assert [a["vote"] for a in answers] == ["no", "no"], answers
            assert all("disk full" in a["reason"] for a in answers)
            assert not any(t in participant.core.txs or participant.core.locks.held_by(t) for t in again)
            with trio.fail_after(10):
                for follower in shard_map.replica_sets[shard_map.partition_of(names[0])][1:]:
                    holds = local.participants[follower].replication.records_of  # type: ignore[union-attr]
                    while any(holds(t) for t in again):
                        await trio.sleep(0.01)
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [11, 10, 11, 11, 10]
        await assert_replicas_equal(local)


async def test_a_replicated_batchs_no_votes_clean_up_concurrently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One follower refuses every record of a replicated primary's prepare batch, and the
    other, which took them, is slow to hear their aborts: each transaction votes no and
    tells it, the aborts in flight together (as separate prepares did; one after another
    they held the later transactions' locks for a round trip each: found by review), and
    every lock is freed."""
    from coordinator import Participant

    refuser: set[str] = set()
    slow: set[str] = set()
    inflight = [0, 0]  # now, most at once
    real_many, real_abort = Participant._repl_prepare_many, Participant._repl_abort

    async def refusing(self: Participant, records: list[Any], origin: str = "", commits: Any = None) -> list[Any]:
        if self.shard in refuser:
            if commits:
                await self._repl_commit_many(commits)  # (the notices riding along still count)
            return [[int(txrpc.Code.FAILED_PRECONDITION), "refused (test)", {}] for _ in records]
        return await real_many(self, records, origin, commits)

    async def slow_abort(self: Participant, txid: int) -> str:
        if self.shard in slow:
            inflight[0] += 1
            inflight[1] = max(inflight)
            try:
                await trio.sleep(0.2)
            finally:
                inflight[0] -= 1
        return await real_abort(self, txid)

    monkeypatch.setattr(Participant, "_repl_prepare_many", refusing)
    monkeypatch.setattr(Participant, "_repl_abort", slow_abort)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.nodes[0]
        names = _primary_keys(shard_map, node.name, 4)
        await open_accounts(cluster, names, 10)
        participant = local.participants[node.name]
        async with txrpc.connect(*node.address) as shard:
            txids = await deposits_at(cluster, shard, names, shard_map.epoch)
            first, second = shard_map.replica_sets[shard_map.partition_of(names[0])][1:]
            refuser.add(first)
            slow.add(second)
            answers = await shard.call("tx.prepare_many", txids)
            assert all(a == "PENDING" or a["vote"] == "no" for a in answers), answers
            with trio.fail_after(10):
                while any(t in participant.core.txs for t in txids):
                    await trio.sleep(0.01)
            assert inflight[1] == len(txids)  # every abort in flight at once
            assert not any(participant.core.locks.held_by(t) for t in txids)
        refuser.clear()
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [10] * 4
        await assert_replicas_equal(local)


async def test_resent_records_that_time_out_are_each_a_refusal_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A follower answers a batch PENDING and never answers the records sent again alone:
    each of those records is refused for lack of an answer within the replication
    timeout (its transaction votes no and aborts), with no error logged. (Timeouts of the
    resends escaped as an exception group, logged as a failure with a traceback: found
    by review.)"""
    import logging

    from coordinator import Participant

    active = [False]
    real_many, real_one = Participant._repl_prepare_many, Participant._repl_prepare

    async def pending(self: Participant, records: list[Any], origin: str = "", commits: Any = None) -> list[Any]:
        if active[0]:
            if commits:
                await self._repl_commit_many(commits)  # (the notices riding along still count)
            return ["PENDING"] * len(records)
        return await real_many(self, records, origin, commits)

    async def silent(self: Participant, txid: int, writes: list[Any], origin: str = "") -> str:
        if active[0]:
            await trio.sleep_forever()
        return await real_one(self, txid, writes, origin)

    monkeypatch.setattr(Participant, "_repl_prepare_many", pending)
    monkeypatch.setattr(Participant, "_repl_prepare", silent)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.nodes[0]
        names = _primary_keys(shard_map, node.name, 2)
        await open_accounts(cluster, names, 10)
        participant = local.participants[node.name]
        assert participant.replication is not None
        participant.replication.timeout_s = 0.5
        async with txrpc.connect(*node.address) as shard:
            txids = await deposits_at(cluster, shard, names, shard_map.epoch)
            active[0] = True
            with caplog.at_level(logging.ERROR, logger="txrpc.replication"):
                answers = await shard.call("tx.prepare_many", txids)
                assert [a["vote"] for a in answers] == ["no", "no"], answers
            assert all("no answer within 0.5 s" in a["reason"] for a in answers), answers
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
            assert not any(t in participant.core.txs for t in txids)
            active[0] = False


async def test_a_followers_batch_at_a_newer_epoch_goes_record_by_record_after_the_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repl.prepare_many whose epoch is newer than the follower's: the follower fetches
    the authority's map first (as for one record) and takes each record on its own path;
    none is taken together before the map is known. The next batch, at the follower's
    epoch, goes together again."""
    counts = _count_follower_writes(monkeypatch)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None and coordinator.shard_map is not None
        before = coordinator.shard_map
        primary, follower = before.nodes[0].name, before.nodes[1].name
        mine = [n for n in (f"acct{i}" for i in range(5000)) if before.primary_of(n).name == primary]
        newer_map = before.with_epoch(before.epoch + 1)
        await coordinator._store_map(newer_map)  # the authority's (durable), not published to the shards
        coordinator.shard_map = newer_map
        replication = local.participants[follower].replication
        assert replication is not None and replication.guard.epoch == before.epoch
        for values in counts.values():
            values.clear()
        async with txrpc.connect(*before.node(follower).address) as client:
            newer = client.options(metadata={"epoch": before.epoch + 1})
            a, b, c, d = [(await cluster.coordinator.call("coord.begin", None))["txid"] for _ in range(4)]
            answers = await newer.call(
                "repl.prepare_many", [[a, [[mine[0], False, 1]]], [b, [[mine[1], False, 2]]]], origin=primary
            )
            assert answers == ["ok", "ok"]
            assert replication.guard.epoch == before.epoch + 1  # it followed the call's epoch
            # (write_prepare is write_prepares of one)
            assert counts == {"prepares": [1, 1], "prepare": [1, 1], "commits": []}, counts
            answers = await newer.call(
                "repl.prepare_many", [[c, [[mine[2], False, 3]]], [d, [[mine[3], False, 4]]]], origin=primary
            )
            assert answers == ["ok", "ok"]
            assert counts == {"prepares": [1, 1, 2], "prepare": [1, 1], "commits": []}, counts
            assert await newer.call("repl.commit_many", [a, b, c, d]) == 4
        store = local.participants[follower].store
        assert [await store.get(k) for k in mine[:4]] == [(True, 1), (True, 2), (True, 3), (True, 4)]


async def test_a_followers_batch_that_fails_before_its_write_frees_what_it_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records a batch took together (locks, prepared in memory) are dropped if the
    batch fails before their write starts: nothing is written, the caller gets an error,
    and a later record for the same keys is taken at once (no lock left behind)."""
    from coordinator import Participant

    counts = _count_follower_writes(monkeypatch)
    real = Participant._each_answered
    fail = [True]

    async def failing(self: Participant, items: Any, one: Any, group: Any = None) -> list[Any]:
        if fail[0] and group is not None:
            fail[0] = False
            raise RuntimeError("the batch failed before its write started (test)")
        return await real(self, items, one, group)

    monkeypatch.setattr(Participant, "_each_answered", failing)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        primary, follower = shard_map.nodes[0].name, shard_map.nodes[1].name
        k1, k2 = [n for n in (f"acct{i}" for i in range(5000)) if shard_map.primary_of(n).name == primary][:2]
        participant = local.participants[follower]
        for values in counts.values():
            values.clear()
        async with txrpc.connect(*shard_map.node(follower).address) as client:
            current = client.options(metadata={"epoch": shard_map.epoch}, retries_max=0)
            a, b = [(await cluster.coordinator.call("coord.begin", None))["txid"] for _ in range(2)]
            with pytest.raises(txrpc.Internal):
                await current.call(
                    "repl.prepare_many", [[a, [[k1, False, 1]]], [a + 10**9, [[k2, False, 1]]]], origin=primary
                )
            assert counts == {"prepares": [], "prepare": [], "commits": []}  # nothing written
            assert [rid for rid in participant.core.txs if rid < 0] == []  # nothing held
            with trio.fail_after(2):  # k1's lock is free: taken at once, not after lock_wait_s
                assert await current.call("repl.prepare_many", [[b, [[k1, False, 5]]]], origin=primary) == ["ok"]
            assert counts == {"prepares": [1], "prepare": [], "commits": []}
            assert await current.call("repl.commit_many", [b]) == 1
        assert await participant.store.get(k1) == (True, 5)


async def test_an_older_follower_gets_one_repl_prepare_per_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower without repl.prepare_many (an older version: UNIMPLEMENTED) gets one
    repl.prepare per record; transfers commit and every replica ends equal."""
    from coordinator import Participant

    real_service = Participant._replication_service
    singles: list[int] = []
    real_prepare = Participant._repl_prepare

    def older(self: Participant) -> txrpc.Service:
        svc = real_service(self)
        del svc.methods["repl.prepare_many"]
        return svc

    async def counting(self: Participant, txid: int, writes: list[Any], origin: str = "") -> str:
        singles.append(txid)
        return await real_prepare(self, txid, writes, origin)

    monkeypatch.setattr(Participant, "_replication_service", older)
    monkeypatch.setattr(Participant, "_repl_prepare", counting)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        assert singles  # the accounts' records went one by one
        assert await transfers(cluster, names, 10, seed=5) > 0
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)


async def test_follower_refuses_an_older_epoch_so_a_deposed_primary_cannot_commit(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 1)
        await open_accounts(cluster, names)
        account = names[0]
        old_primary = local.config.shard_map.primary_of(account).name
        assert local.coordinator is not None
        # The authority deposes the primary, but it never hears of it (cut off).
        deposed = local.participants[old_primary]
        deposed_guard = deposed.replication.guard  # type: ignore[union-attr]
        stale = deposed_guard.shard_map
        result = await local.coordinator.mark_down(old_primary)
        assert result["epoch"] == stale.epoch + 1
        deposed_guard._shard_map = stale  # it missed the new map
        # Its clients still route to it at the old epoch: the write cannot commit there,
        # because its followers refuse the old epoch.
        async with txrpc.cluster(local.config) as stale_client:
            stale_client.router._shard_map = stale  # a client that has not heard either
            with pytest.raises((txrpc.TransactionAborted, txrpc.OutcomeUnknown, txrpc.WrongEpoch)):
                async with stale_client.transaction() as t:
                    await t.bank.deposit(account, 1_000_000)
        assert deposed.replication.stats["prepares_sent"] > 0  # type: ignore[union-attr]
        # The new primary serves the account, unchanged.
        new_primary = local.coordinator.shard_map.primary_of(account).name  # type: ignore[union-attr]
        assert new_primary != old_primary
        assert await cluster.call(account, "bank.balance", account) == 100


@pytest.mark.parametrize("read", ["balance", "scan"])
async def test_a_deposed_primary_cannot_make_a_stale_read_part_of_a_commit(tmp_path: Path, read: str) -> None:
    """A transaction only reads at a primary that was deposed and never heard of it (its
    vote there is read-only: no record to replicate) and writes elsewhere: the read-only
    vote is fenced with the followers, which refuse the old epoch, so the transaction
    aborts instead of committing a write computed from the stale read. (The fence ran
    only on a re-prepare of a transaction already prepared, never on a read-only vote.)
    A scan holds the shard-wide scan lock and no key lock: its vote is fenced with every
    follower of the shard's partitions. (Found by review: a scan named no keys, no
    follower was asked, and it committed.)"""
    async with local_cluster(tmp_path, [bank, audit], replication_factor=3) as local, txrpc.cluster(
        local.config
    ) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None
        shard_map = local.config.shard_map
        source = _primary_key(shard_map, "n1")
        target = _primary_key(shard_map, "n2")
        await open_accounts(cluster, [source, target])
        deposed = local.participants["n1"]
        assert deposed.replication is not None
        stale = deposed.replication.guard.shard_map
        await coordinator.mark_down("n1")
        deposed.replication.guard._shard_map = stale  # it missed the new map
        deposed.replication.map_source = None  # and cannot ask the authority
        assert coordinator.shard_map is not None
        cluster.router._shard_map = coordinator.shard_map  # this client knows the new map
        assert await cluster.call(source, "bank.deposit", source, 50) == 150  # at the new primary
        async with txrpc.cluster(local.config) as stale_client:
            stale_client.router._shard_map = stale  # a client that has not heard either
            with pytest.raises(txrpc.TransactionAborted, match=r"not the primary|epoch"):
                async with stale_client.transaction() as t:
                    if read == "scan":
                        seen = await t.audit.scan_sum(source, source)
                    else:
                        seen = await t.bank.balance(source)
                    assert seen == 100  # read at n1: the stale value
                    await t.bank.deposit(target, seen)  # a write computed from it, at n2
        assert await cluster.call(target, "bank.balance", target) == 100  # not committed


async def test_primary_crash_with_prepared_transactions_fails_over(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        await transfers(cluster, names, 10, seed=2)
        victim = local.config.shard_map.primary_of(names[0]).name
        other = next(n for n in names if local.config.shard_map.primary_of(n).name != victim)
        # A cross-shard transaction prepared everywhere (replicated), then its coordinator
        # decision is made, and the victim dies before it hears phase 2.
        t = cluster.transaction()
        await t.__aenter__()
        await t.bank.withdraw(names[0], 7)
        await t.bank.deposit(other, 7)
        victim_participant = local.participants[victim]
        txid = t.txid
        vote = await victim_participant.prepare(txid)
        assert vote["vote"] == "yes"
        local.crash(victim)
        with trio.fail_after(30):
            with pytest.raises((txrpc.OutcomeUnknown, txrpc.TransactionAborted)):
                await t.__aexit__(None, None, None)
        assert local.coordinator is not None
        await local.coordinator.mark_down(victim)
        # The new primary inherited the prepared record and resolves it through the
        # coordinator (termination protocol); the totals are conserved either way.
        with trio.fail_after(30):
            while True:
                in_doubt = sum(len(p.core.in_doubt()) for p in local.participants.values())
                if in_doubt == 0:
                    break
                await trio.sleep(0.2)
        assert await total(cluster, names) == 100 * len(names)
        await transfers(cluster, names, 10, seed=3)
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)


async def test_a_node_marked_down_catches_up_and_rejoins_while_transfers_run(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 3)
        await open_accounts(cluster, names)
        assert local.coordinator is not None
        ring_primary = {n: local.config.shard_map.primary_of(n).name for n in names}
        await local.coordinator.mark_down("n0")
        local.crash("n0")
        await transfers(cluster, names, 20, seed=4)  # n0 misses these
        await local.start_shard("n0")  # stale data, old prepared records: recovers, learns epoch 2
        coordinator = local.coordinator
        # It copies its partitions while transfers commit.
        result, moved = await during_transfers(cluster, names, 10, lambda: coordinator.rejoin("n0"))
        assert result["epochs"] == [3, 4] and result["rows"] > 0
        assert moved > 0
        shard_map = local.coordinator.shard_map
        assert shard_map is not None and shard_map.epoch == 4
        # The ring's order is back: n0 is primary again of its keys.
        assert {n: shard_map.primary_of(n).name for n in names} == ring_primary
        await transfers(cluster, names, 10, seed=5)
        assert await total(cluster, names) == 100 * len(names), await explain(local)
        await assert_replicas_equal(local)
        held = await local.participants["n0"].store.items()
        assert sorted(k for k in held if k.startswith("acct")) == sorted(names)


async def test_a_prepare_refused_for_lack_of_a_replica_aborts_at_once(tmp_path: Path) -> None:
    """A follower is down and not yet marked down: the primary cannot make its prepare
    record durable on every replica, votes no, and aborts the transaction itself (locks
    free at once, nothing left in doubt) -- it does not wait for the coordinator's
    abort, which a coordinator crash would lose. (Found by the simulator: the
    transaction stayed prepared, its locks held, and was never asked about.)"""
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        name = next(n for n in (f"acct{i}" for i in range(1000)) if shard_map.primary_of(n).name == "n0")
        await open_accounts(cluster, [name])
        local.crash("n2")  # a follower of every partition (R = 3 of 3 nodes)
        participant = local.participants["n0"]
        async with txrpc.connect(*shard_map.node("n0").address) as shard:
            txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
            meta = {"txid": txid, "op_seq": 1, "epoch": shard_map.epoch}
            assert await shard.options(metadata=meta).call("bank.deposit", name, 5) == 105
            with trio.fail_after(30):
                answer = await shard.call("tx.prepare", txid)
            assert answer["vote"] == "no" and "not on every replica" in answer["reason"]
            # Decided at the shard itself: no coordinator abort was sent.
            assert txid not in participant.core.txs and participant.core.in_doubt() == []
            assert not participant.core.locks.held_by(txid)
            assert local.coordinator is not None
            await local.coordinator.mark_down("n2")  # (reads too need every replica of the epoch)
            async with cluster.transaction() as t:  # the account is free
                assert await t.bank.balance(name) == 100


async def test_a_move_cut_short_by_a_coordinator_restart_is_abandoned(tmp_path: Path) -> None:
    """The coordinator stops (crash, kill -9) after a move's interim map is durable and
    before the copies are done: on restart it does not keep the half-copied joiner in
    the sets -- the sets the move came from come back at a new epoch and are published."""
    from txrpc._shardmap import ShardMap

    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        coordinator = local.coordinator
        assert coordinator is not None
        await coordinator.mark_down("n0")
        before = coordinator.shard_map
        assert before is not None
        # What _move makes durable first: n0 back as a follower of every set (no copy yet).
        interim = ShardMap(
            before.epoch + 1, before.replication_factor, before.partitions, before.nodes,
            tuple((*members, "n0") for members in before.replica_sets),
        )  # fmt: skip
        await coordinator._store_map(interim, moving_from=before)
        local.crash("coordinator")
        await trio.sleep(0.1)
        restarted = await local.start_coordinator()
        after = restarted.shard_map
        assert after is not None and after.epoch == interim.epoch + 1
        assert after.replica_sets == before.replica_sets
        with trio.fail_after(10):  # published: the shards installed it
            while any(p.replication is None or p.replication.guard.epoch != after.epoch
                      for p in local.participants.values()):  # fmt: skip
                await trio.sleep(0.05)
        assert await transfers(cluster, names, 5, seed=6) > 0
        assert await total(cluster, names) == 100 * len(names), await explain(local)
        await assert_replicas_equal(local)


async def test_an_interrupted_rejoin_takes_the_joiner_out_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin's rejoin call goes away while the joiner is still copying (its deadline,
    Ctrl-C, a dropped connection): the authority does not leave the half-copied node in
    the replica sets (a failover could make it primary of data it never copied) — it
    puts the previous sets back at a new epoch; a later rejoin completes. (Found by the
    simulator, where the fault schedule's end cancelled a rejoin mid-copy.)"""
    from coordinator import Participant

    slow = [True]
    real_snapshot = Participant._repl_snapshot

    async def slow_snapshot(self: Participant, *args: Any, **kwargs: Any) -> Any:
        if slow[0]:
            await trio.sleep(30)
        return await real_snapshot(self, *args, **kwargs)

    monkeypatch.setattr(Participant, "_repl_snapshot", slow_snapshot)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 3)
        await open_accounts(cluster, names)
        coordinator = local.coordinator
        assert coordinator is not None
        await coordinator.mark_down("n0")
        local.crash("n0")
        await transfers(cluster, names, 10, seed=4)  # n0 misses these
        await local.start_shard("n0")
        before = coordinator.shard_map
        assert before is not None and all("n0" not in members for members in before.replica_sets)
        with trio.move_on_after(1.0) as scope:
            await cluster.coordinator.options(retries_max=0).call("coord.rejoin", "n0")
        assert scope.cancelled_caught  # the caller gave up while n0 was copying
        with trio.fail_after(10):
            while coordinator.shard_map is None or coordinator.shard_map.epoch < before.epoch + 2:
                await trio.sleep(0.02)
        after = coordinator.shard_map
        assert after.epoch == before.epoch + 2 and after.replica_sets == before.replica_sets
        await transfers(cluster, names, 10, seed=5)
        assert await total(cluster, names) == 100 * len(names), await explain(local)
        await assert_replicas_equal(local)
        slow[0] = False
        result = await coordinator.rejoin("n0")
        assert result["epochs"] == [after.epoch + 1, after.epoch + 2]
        assert await total(cluster, names) == 100 * len(names), await explain(local)
        await assert_replicas_equal(local)


async def test_a_record_taken_at_the_join_epoch_while_the_catch_up_starts_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A joiner takes a prepare record at the join epoch, and its catch-up starts while
    that record is still being written: the record is the joiner's share of a
    transaction the primary's snapshot will not contain (it was replicated to the
    joiner), so it must not count as a stale one from before the join. (Found by
    test_replication_processes in CI: the record was dropped as "superseded", the
    joiner had answered "ok", the commit notice found nothing to apply, and the joiner,
    primary after the move, served a balance one transfer old: money was created.)"""

    gate, entered = gate_catch_ups(monkeypatch)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None
        shard_map = local.config.shard_map
        name = next(n for n in (f"acct{i}" for i in range(1000)) if shard_map.primary_of(n).name == "n1")
        await open_accounts(cluster, [name])
        await coordinator.mark_down("n0")
        local.crash("n0")
        await local.start_shard("n0")
        joiner = local.participants["n0"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coordinator.rejoin, "n0")
            with trio.fail_after(10):
                await entered.wait()  # the join epoch is installed; n0 is about to catch up
            interim = coordinator.shard_map
            assert interim is not None and "n0" in interim.replicas_of(name)
            async with txrpc.connect(*interim.node("n1").address) as shard:
                txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
                meta = {"txid": txid, "op_seq": 1, "epoch": interim.epoch}
                assert await shard.options(metadata=meta).call("bank.deposit", name, 5) == 105
                votes: list[Any] = []

                async def prepare() -> None:
                    votes.append(await shard.call("tx.prepare", txid))

                async with joiner.store.database.write_lock:  # n0's record write is held up
                    nursery.start_soon(prepare)
                    with trio.fail_after(10):
                        while not any(rid < 0 for rid in joiner.core.txs):
                            await trio.sleep(0.01)
                    gate.set()  # the catch-up starts while the record is being written
                    await trio.sleep(0.2)
                with trio.fail_after(10):
                    while not votes:
                        await trio.sleep(0.01)
                assert votes[0]["vote"] == "yes"
                await trio.sleep(0.1)  # the catch-up's drop loop waited for the write, then ran
                assert any(rid < 0 for rid in joiner.core.txs), "n0 dropped its record of the join epoch"
                # n1's snapshot waits for the transaction; its commit reaches n0 too.
                await cluster.coordinator.call("coord.commit", txid, ["n1"])
        assert await cluster.call(name, "bank.balance", name) == 105
        await assert_replicas_equal(local)


async def test_a_primary_switched_over_tells_the_followers_that_took_its_record(tmp_path: Path) -> None:
    """A transaction prepared at n1, then n0 promoted (n1 is a follower now), then the
    commit: n1 tells the followers that took its prepare record at once -- it is not
    their primary any more, but they hold the record and its locks until they hear (they
    waited for the termination protocol before: a stall after every switchover or move)."""
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None and coordinator.shard_map is not None
        shard_map = local.config.shard_map
        name = next(
            n for n in (f"acct{i}" for i in range(5000))
            if shard_map.primary_of(n).name == "n1" and "n0" in shard_map.replicas_of(n)
        )  # fmt: skip
        await open_accounts(cluster, [name])
        for participant in local.participants.values():
            participant.decision_wait_s = 60.0  # the termination protocol would be too late
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
        async with txrpc.connect(*shard_map.node("n1").address) as n1:
            meta = {"txid": txid, "op_seq": 1, "epoch": coordinator.shard_map.epoch}
            await n1.options(metadata=meta).call("bank.deposit", name, 5)
            assert (await n1.call("tx.prepare", txid))["vote"] == "yes"
        await coordinator.promote("n0")
        assert coordinator.shard_map.primary_of(name).name == "n0"
        await cluster.coordinator.call("coord.commit", txid, ["n1"])
        with trio.fail_after(5):
            while any(rid < 0 for p in local.participants.values() for rid in p.core.txs):
                await trio.sleep(0.02)
        assert await cluster.call(name, "bank.balance", name) == 105
        await assert_replicas_equal(local)


def gate_catch_ups(monkeypatch: pytest.MonkeyPatch) -> tuple[trio.Event, trio.Event]:
    """Hold every joiner's snapshot catch-up until ``gate`` is set; ``entered`` is set
    once one has begun. Returns ``(gate, entered)``."""
    from coordinator import Participant

    gate, entered = trio.Event(), trio.Event()
    real_catch_up = Participant._repl_catch_up

    async def gated_catch_up(self: Participant, partitions: list[int]) -> Any:
        entered.set()
        await gate.wait()
        return await real_catch_up(self, partitions)

    monkeypatch.setattr(Participant, "_repl_catch_up", gated_catch_up)
    return gate, entered


def _primary_key(shard_map: Any, node: str) -> str:
    return _primary_keys(shard_map, node, 1)[0]


async def test_a_join_epoch_commit_applied_before_the_catch_up_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction of the join epoch spans two primaries; one commits it and tells the
    joiner, which applies every record of it (the other primary's share too) before its
    catch-up begins; the other primary has not applied it yet when its snapshot is asked
    for. The snapshot waits for it (it is prepared there), so the page cannot carry the
    older value over the one the joiner applied. (Found by an independent review: the
    page overwrote it and the joiner stayed one write behind.)"""
    from coordinator import Participant

    gate, entered = gate_catch_ups(monkeypatch)
    hold_commit = trio.Event()
    real_commit = Participant.commit.__wrapped__  # type: ignore[attr-defined]  # under _not_cancelled_midway
    held: dict[str, int] = {}

    async def slow_commit(self: Participant, txid: int) -> str:
        if self.shard == "n1" and txid == held.get("txid"):
            await hold_commit.wait()
        with trio.CancelScope(shield=True):
            return str(await real_commit(self, txid))

    monkeypatch.setattr(Participant, "commit", slow_commit)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None
        a, b = _primary_key(local.config.shard_map, "n1"), _primary_key(local.config.shard_map, "n2")
        await open_accounts(cluster, [a, b])
        await coordinator.mark_down("n0")
        local.crash("n0")
        await local.start_shard("n0")
        joiner = local.participants["n0"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coordinator.rejoin, "n0")
            with trio.fail_after(10):
                await entered.wait()
            interim = coordinator.shard_map
            assert interim is not None
            txid = held["txid"] = (await cluster.coordinator.call("coord.begin", None))["txid"]
            meta = {"txid": txid, "op_seq": 1, "epoch": interim.epoch}
            async with txrpc.connect(*interim.node("n1").address) as n1, txrpc.connect(
                *interim.node("n2").address
            ) as n2:
                await n1.options(metadata=meta).call("bank.withdraw", a, 1)
                await n2.options(metadata=meta).call("bank.deposit", b, 1)
            nursery.start_soon(cluster.coordinator.call, "coord.commit", txid, ["n1", "n2"])
            with trio.fail_after(10):  # n2 committed and told n0, which applied n1's share too
                while await joiner.store.get(a) != (True, 99):
                    await trio.sleep(0.01)
            gate.set()
            await trio.sleep(0.3)  # n0's catch-up asks n1 for its snapshot meanwhile
            hold_commit.set()
        assert await joiner.store.get(a) == (True, 99)
        assert await total(cluster, [a, b]) == 200, await explain(local)
        await assert_replicas_equal(local)


async def test_a_joiner_restarted_before_its_catch_up_loses_no_join_epoch_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The joiner takes a record at the join epoch and restarts: it recovers the record
    with the epoch it was taken at (so its catch-up keeps it) and the slot of its
    primary, and the primary's snapshot waits for that transaction anyway, so the copy
    has its outcome. (Found by an independent review: the recovered record had no
    epoch, the catch-up dropped it as an old one, and the joiner ended one write behind.)"""
    from coordinator import Coordinator

    real_publish = Coordinator._publish
    published, go = trio.Event(), trio.Event()
    hold: dict[str, int] = {}

    async def publish(self: Coordinator, shard_map: Any) -> Any:
        result = await real_publish(self, shard_map)
        if shard_map.epoch == hold.get("epoch"):
            published.set()
            await go.wait()  # the joiner restarts before repl.catch_up is sent
        return result

    monkeypatch.setattr(Coordinator, "_publish", publish)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None and coordinator.shard_map is not None
        a = _primary_key(local.config.shard_map, "n1")
        await open_accounts(cluster, [a])
        await coordinator.mark_down("n0")
        local.crash("n0")
        await local.start_shard("n0")
        hold["epoch"] = coordinator.shard_map.epoch + 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(coordinator.rejoin, "n0")
            with trio.fail_after(10):
                await published.wait()
            interim = coordinator.shard_map
            txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
            async with txrpc.connect(*interim.node("n1").address) as n1:
                meta = {"txid": txid, "op_seq": 1, "epoch": interim.epoch}
                await n1.options(metadata=meta).call("bank.deposit", a, 5)
                assert (await n1.call("tx.prepare", txid))["vote"] == "yes"  # n0 took its record
            local.crash("n0")
            restarted = await local.start_shard("n0")  # recovers the record, with its epoch and origin
            (rid,) = [rid for rid in restarted.core.txs if rid < 0]
            assert restarted._replicated_epoch[rid] == interim.epoch
            assert restarted.replication is not None and restarted.replication.records_of(txid) == [rid]
            assert restarted.replication.origin_index("n1") == (-rid) % 1024
            go.set()
            await trio.sleep(0.3)  # n1's snapshot waits for the transaction
            await cluster.coordinator.call("coord.commit", txid, ["n1"])
        assert await local.participants["n0"].store.get(a) == (True, 105)
        await assert_replicas_equal(local)


async def test_a_primary_behind_the_join_epoch_refuses_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary that cannot learn the join epoch (it missed the new map and cannot
    reach the authority) would plan its next prepares without the joiner: it refuses to
    serve the joiner's snapshot, and the move is abandoned instead of leaving the joiner
    behind. (Found by an independent review.)"""
    from coordinator import Participant

    real_install = Participant._repl_install_map

    async def install_map(self: Participant, shard_map: Any) -> Any:
        if self.shard in ("n1", "n2"):
            raise txrpc.Unavailable("cut off from the authority")
        return await real_install(self, shard_map)

    monkeypatch.setattr(Participant, "_repl_install_map", install_map)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        await coordinator.mark_down("n0")
        local.crash("n0")
        await local.start_shard("n0")
        for name in ("n1", "n2"):  # nor can they ask the authority
            replication = local.participants[name].replication
            assert replication is not None
            replication.map_source = None
        with pytest.raises(txrpc.Unavailable, match="behind the joiner"):
            await coordinator.rejoin("n0")
        monkeypatch.setattr(Participant, "_repl_install_map", real_install)
        after = coordinator.shard_map
        assert after is not None and all("n0" not in members for members in after.replica_sets)


async def test_a_follower_record_the_primary_gave_up_on_stays_in_memory_as_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary's replication timeout cancels a follower's repl.prepare while its
    record is being written: the write completes (shielded) and the follower keeps the
    record in memory too, in doubt, until the coordinator's decision (presumed abort)
    ends it -- it does not forget a record that is on disk (a restart would then find
    two records holding one lock). (Found by an independent review.)"""
    import sqlalchemy as sa

    from storage._shard_store import ShardStore
    from storage._txn_schema import prepared

    slow = [False]

    def slowed(real: Any) -> Any:
        async def write(self: ShardStore, *args: Any, **kwargs: Any) -> None:
            await real(self, *args, **kwargs)
            if self.shard == "n2" and slow[0]:
                await trio.sleep(1.0)  # durable; the writer hears of it late (a slow disk)

        return write

    monkeypatch.setattr(ShardStore, "write_prepares", slowed(ShardStore.write_prepares))  # (write_prepare's too)
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None and coordinator.shard_map is not None
        shard_map = local.config.shard_map
        a = _primary_key(shard_map, "n1")
        await open_accounts(cluster, [a])
        replication = local.participants["n1"].replication
        assert replication is not None
        replication.timeout_s = 0.3
        slow[0] = True
        async with txrpc.connect(*shard_map.node("n1").address) as n1:
            txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
            meta = {"txid": txid, "op_seq": 1, "epoch": coordinator.shard_map.epoch}
            await n1.options(metadata=meta).call("bank.deposit", a, 5)
            assert (await n1.call("tx.prepare", txid))["vote"] == "no"  # n2 did not answer in time
        await trio.sleep(1.2)
        follower = local.participants["n2"]

        def records(conn: Any) -> list[int]:
            return [row.txid for row in conn.execute(sa.select(prepared.c.txid).where(prepared.c.shard == "n2"))]

        on_disk = await follower.store.database.read(records)
        in_memory = [rid for rid in follower.core.txs if rid < 0]
        assert on_disk and sorted(on_disk) == sorted(in_memory)
        slow[0] = False
        await cluster.coordinator.call("coord.abort", txid, ["n1"])
        with trio.fail_after(30):  # the follower asks the coordinator: aborted
            while [rid for rid in follower.core.txs if rid < 0]:
                await trio.sleep(0.1)
        assert await follower.store.database.read(records) == []
        local.crash("n2")
        await local.start_shard("n2")
        await assert_replicas_equal(local)



def _toml(data_dir: Path, ports: list[int], nodes: int, replication_factor: int = 3) -> str:
    lines = ["[cluster]", f"replication_factor = {replication_factor}", "partitions = 256", f'data_dir = "{data_dir}"',
             "", "[coordinator]", 'host = "127.0.0.1"', f"port = {ports[0]}", ""]  # fmt: skip
    for index in range(nodes):
        lines += ["[[nodes]]", f'name = "n{index}"', 'host = "127.0.0.1"', f"port = {ports[index + 1]}", ""]
    return "\n".join(lines)


async def test_records_of_one_transaction_from_two_primaries_stay_apart_when_the_node_list_shifts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower keys each primary's record of a transaction by a slot of its own for
    that primary. A node added with a name that sorts first shifts every node's place in
    the map's list: a transaction prepared at one primary before the change and at
    another after it must still leave two records at the follower, not one. (Found by an
    independent review: the second was taken for a resend of the first, and the
    follower never applied its write.)"""
    from _cluster_helpers import free_ports


    ports = free_ports(5)
    three = txrpc.ClusterConfig.from_toml(_toml(tmp_path, ports, 3), source="three.toml")
    four_toml = _toml(tmp_path, ports, 3) + f'\n[[nodes]]\nname = "m0"\nhost = "127.0.0.1"\nport = {ports[4]}\n'
    four = txrpc.ClusterConfig.from_toml(four_toml, source="four.toml")
    a, b = _primary_key(three.shard_map, "n1"), _primary_key(three.shard_map, "n0")
    gate, entered = gate_catch_ups(monkeypatch)
    async with trio.open_nursery() as nursery:
        local = LocalCluster(three, nursery, [bank])
        coordinator = await local.start_coordinator()
        for name in ("n0", "n1", "n2"):
            await local.start_shard(name)
        async with txrpc.cluster(three) as cluster:
            await open_accounts(cluster, [a, b])
            local.config = four
            await local.start_shard("m0")
            assert coordinator.shard_map is not None
            epoch = coordinator.shard_map.epoch
            txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
            async with txrpc.connect(*three.shard_map.node("n1").address) as n1, txrpc.connect(
                *three.shard_map.node("n0").address
            ) as n0:
                meta = {"txid": txid, "op_seq": 1, "epoch": epoch}
                await n1.options(metadata=meta).call("bank.withdraw", a, 1)
                assert (await n1.call("tx.prepare", txid))["vote"] == "yes"  # before the change
                nursery.start_soon(coordinator.add_node, {"name": "m0", "host": "127.0.0.1", "port": ports[4]})
                with trio.fail_after(10):
                    await entered.wait()  # the interim epoch: m0 first in the node list
                meta = {"txid": txid, "op_seq": 1, "epoch": epoch + 1}
                await n0.options(metadata=meta).call("bank.deposit", b, 1)
                assert (await n0.call("tx.prepare", txid))["vote"] == "yes"  # after it
            follower = local.participants["n2"]
            assert follower.replication is not None
            assert len(follower.replication.records_of(txid)) == 2
            await cluster.coordinator.call("coord.commit", txid, ["n0", "n1"])
            gate.set()
            with trio.fail_after(20):
                while coordinator.shard_map.epoch < epoch + 2:
                    await trio.sleep(0.05)
            assert await total(cluster, [a, b]) == 200, await explain(local)
            await assert_replicas_equal(local)
        await local.stop()


async def test_moves_are_refused_at_replication_factor_one(tmp_path: Path) -> None:
    """R = 1: an online move would copy a partition while nothing replicates the commits
    made meanwhile to the new node, nor fences the old primary after the hand-over
    (found by review: writes were lost both ways), so add-node and remove-node are
    refused with a typed error that says what to do, and the map does not change."""
    from _cluster_helpers import free_ports

    ports = free_ports(5)
    three = txrpc.ClusterConfig.from_toml(_toml(tmp_path, ports, 3, replication_factor=1), source="three.toml")
    async with trio.open_nursery() as nursery:
        local = LocalCluster(three, nursery, [bank])
        coordinator = await local.start_coordinator()
        for node in ("n0", "n1", "n2"):
            await local.start_shard(node)
        before = coordinator.shard_map
        with pytest.raises(txrpc.FailedPrecondition, match="replication_factor >= 2"):
            await coordinator.add_node({"name": "n3", "host": "127.0.0.1", "port": ports[4]})
        with pytest.raises(txrpc.FailedPrecondition, match="replication_factor >= 2"):
            await coordinator.remove_node("n2")
        assert coordinator.shard_map == before
        await local.stop()


async def test_autocommit_calls_go_on_after_a_coordinator_restart(tmp_path: Path) -> None:
    """A transactional call outside a transaction on a replicated shard commits through
    the coordinator under a txid the shard leased from it. After a coordinator restart
    the rest of the lease is unknown there: the shard drops the lease, frees the refused
    attempt's locks at once and leases again. (Found by review: every later call failed,
    and each refused attempt held its lock until the idle timeout.)"""
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        name = accounts(local.config, 1)[0]
        await open_accounts(cluster, [name])
        assert await cluster.call(name, "bank.deposit", name, 1) == 101  # leases a block of txids
        local.crash("coordinator")
        await trio.sleep(0.1)
        await local.start_coordinator()
        with trio.fail_after(10):
            assert await cluster.call(name, "bank.deposit", name, 1) == 102
            assert await cluster.call(name, "bank.deposit", name, 1) == 103
        primary = local.participants[local.config.shard_map.primary_of(name).name]
        assert [t for t, tx in primary.core.txs.items() if tx.state.value != "prepared"] == []


async def test_a_snapshot_waits_for_prepared_transactions_only_so_long(tmp_path: Path) -> None:
    """A primary's first snapshot page waits for the transactions it holds prepared, for
    at most six replication timeouts: one left in doubt makes the catch-up fail, the move
    is abandoned (the previous sets come back), and once it is decided the move goes."""
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        coordinator = local.coordinator
        assert coordinator is not None
        shard_map = local.config.shard_map
        name = _primary_key(shard_map, "n1")
        await open_accounts(cluster, [name])
        await coordinator.mark_down("n0")
        local.crash("n0")
        await local.start_shard("n0")
        before = coordinator.shard_map
        assert before is not None
        primary = local.participants["n1"]
        assert primary.replication is not None
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
        async with txrpc.connect(*shard_map.node("n1").address) as n1:
            meta = {"txid": txid, "op_seq": 1, "epoch": before.epoch}
            await n1.options(metadata=meta).call("bank.deposit", name, 5)
            assert (await n1.call("tx.prepare", txid))["vote"] == "yes"  # in doubt until decided
        # Shortened after the prepare (whose follower write it also bounds): the wait, 1.2 s.
        primary.replication.timeout_s = 0.2
        with trio.fail_after(30), pytest.raises(txrpc.Unavailable, match="still in doubt"):
            await coordinator.rejoin("n0")
        after = coordinator.shard_map
        assert after is not None and after.replica_sets == before.replica_sets
        await cluster.coordinator.call("coord.commit", txid, ["n1"])
        await coordinator.rejoin("n0")
        assert await local.participants["n0"].store.get(name) == (True, 105)
        await assert_replicas_equal(local)


async def test_add_node_and_remove_node_move_about_a_share_of_the_data_while_transfers_run(tmp_path: Path) -> None:
    from _cluster_helpers import free_ports

    ports = free_ports(5)
    three = txrpc.ClusterConfig.from_toml(_toml(tmp_path, ports, 3), source="three.toml")
    four = txrpc.ClusterConfig.from_toml(_toml(tmp_path, ports, 4), source="four.toml")
    async with trio.open_nursery() as nursery:
        local = LocalCluster(three, nursery, [bank])
        await local.start_coordinator()
        for name in ("n0", "n1", "n2"):
            await local.start_shard(name)
        async with txrpc.cluster(three) as cluster:
            names = [f"acct{i}" for i in range(60)]
            await open_accounts(cluster, names)
            local.config = four  # the operator lists n3 in the file and starts it
            await local.start_shard("n3")
            coordinator = local.coordinator
            assert coordinator is not None
            added, moved = await during_transfers(
                cluster, names, 100, lambda: coordinator.add_node({"name": "n3", "host": "127.0.0.1", "port": ports[4]})
            )
            assert moved > 0
            shard_map = local.coordinator.shard_map
            assert shard_map is not None and "n3" in shard_map
            # R = 3 of 4 nodes: n3 takes about a quarter of all the copies (the ring's share).
            copies = sum(len(m) for m in shard_map.replica_sets)
            share = sum(1 for m in shard_map.replica_sets if "n3" in m) / copies
            assert 0.15 < share < 0.35, share
            assert shard_map.replica_sets == four.shard_map.with_epoch(shard_map.epoch).replica_sets
            assert added["rows"] > 0 and added["dropped"] > 0
            assert await total(cluster, names) == 100 * len(names)
            await assert_replicas_equal(local)
            # Rows of the partitions a node left are gone from it.
            for name, participant in local.participants.items():
                for key in await participant.store.items():
                    assert name in shard_map.replicas_of(key), (name, key)

            removed = await local.coordinator.remove_node("n1")
            shard_map = local.coordinator.shard_map
            assert "n1" not in shard_map and removed["epochs"][1] == shard_map.epoch
            assert all(len(m) == 3 for m in shard_map.replica_sets)
            local.crash("n1")
            await transfers(cluster, names, 20, seed=7)
            assert await total(cluster, names) == 100 * len(names)
            await assert_replicas_equal(local)
        await local.stop()


async def test_heartbeats_mark_a_dead_primary_down_and_transfers_go_on(tmp_path: Path) -> None:
    # A generous failure timeout while the shards start one after another (on a slow
    # machine that can take longer than a second), the short one once each has answered.
    async with local_cluster(
        tmp_path, [bank], replication_factor=3, coordinator={"failure_timeout_s": 30.0}
    ) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        assert local.coordinator is not None and local.coordinator.shard_map is not None
        with trio.fail_after(10):
            while set(local.coordinator._last_seen) != {n.name for n in local.config.shard_map.nodes}:
                await trio.sleep(0.05)
        local.coordinator.failure_timeout_s = 2.0
        assert local.coordinator.shard_map.epoch == 1
        await trio.sleep(2.5)  # healthy nodes answer their heartbeats: nothing changes
        assert local.coordinator.shard_map.epoch == 1
        local.crash("n1")
        with trio.fail_after(10):
            while local.coordinator.shard_map.epoch == 1:
                await trio.sleep(0.1)
        shard_map = local.coordinator.shard_map
        assert shard_map.epoch == 2 and all("n1" not in m for m in shard_map.replica_sets)
        assert await transfers(cluster, names, 20, seed=9) > 0
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)


async def test_cancelled_while_a_cluster_opens_leaves_no_task_group_behind(tmp_path: Path) -> None:
    """Opening a cluster fetches the authority's map (bounded); a cancellation that lands
    there must close what was opened (found by the simulator: trio's cancel-scope stack
    was corrupted). The coordinator here accepts connections and never answers."""
    import socket

    from _cluster_helpers import free_ports

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        node_port = free_ports(1)[0]
        config = txrpc.ClusterConfig.from_toml(
            f'[cluster]\npartitions = 64\ndata_dir = "{tmp_path}"\n[coordinator]\nhost = "127.0.0.1"\n'
            f'port = {port}\n[[nodes]]\nname = "n0"\nhost = "127.0.0.1"\nport = {node_port}\n',
            source="silent.toml",
        )
        for _ in range(3):
            with trio.move_on_after(0.3) as scope:
                async with txrpc.cluster(config):
                    await trio.sleep_forever()
            assert scope.cancelled_caught
        await trio.sleep(0.01)  # the task's cancel-scope stack is intact
    finally:
        silent.close()


async def test_promote_moves_primaries_and_refusals_are_typed(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        coordinator = local.coordinator
        assert coordinator is not None
        result, moved = await during_transfers(cluster, names, 30, lambda: coordinator.promote("n1"))
        assert result["epoch"] == 2 and moved > 0
        shard_map = coordinator.shard_map
        assert shard_map is not None and all(members[0] == "n1" for members in shard_map.replica_sets)
        assert await transfers(cluster, names, 10, seed=31) > 0
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)
        # Bad requests get a typed error and change nothing.
        with pytest.raises(txrpc.InvalidArgument, match="no node named"):
            await coordinator.mark_down("nobody")
        follower = local.participants["n2"]
        async with txrpc.connect("127.0.0.1", local.config.shard_map.node("n2").port) as client:
            with pytest.raises(txrpc.InvalidArgument, match="positive integers"):
                await client.call("repl.commit_many", [1, -2])
            with pytest.raises(txrpc.InvalidArgument, match="epoch"):
                await client.call("repl.prepare", 5, [["acct0", False, 1]], origin="n1")  # no epoch: refused
        assert follower.core.in_doubt() == []
        assert coordinator.shard_map is shard_map
        # Three nodes at R = 3: none can leave (every partition would lose a replica).
        with pytest.raises(txrpc.FailedPrecondition, match="would leave 2 nodes for replication factor 3"):
            await coordinator.remove_node("n2")
        assert coordinator.shard_map is shard_map


async def test_the_last_replica_of_a_partition_cannot_be_marked_down(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank], replication_factor=1) as local:
        assert local.coordinator is not None
        before = local.coordinator.shard_map
        with pytest.raises(txrpc.FailedPrecondition, match="last replica"):
            await local.coordinator.mark_down("n0")
        assert local.coordinator.shard_map is before


async def test_a_joiner_that_cannot_catch_up_is_taken_out_again(tmp_path: Path) -> None:
    """add-node of a node nobody runs: its catch-up fails, the authority puts the previous
    replica sets back at a new epoch and refuses the move; transfers go on, nothing lost."""
    async with local_cluster(tmp_path, [bank], replication_factor=2) as local, txrpc.cluster(local.config) as cluster:
        names = accounts(local.config, 2)
        await open_accounts(cluster, names)
        coordinator = local.coordinator
        assert coordinator is not None and coordinator.shard_map is not None
        before = coordinator.shard_map
        (port,) = free_ports(1)  # nothing listens there
        with pytest.raises(txrpc.Unavailable, match="could not catch up"):
            await coordinator.add_node({"name": "n9", "host": "127.0.0.1", "port": port})
        after = coordinator.shard_map
        assert after is not None and after.epoch == before.epoch + 2
        assert after.replica_sets == before.replica_sets
        assert [n.name for n in after.nodes] == [n.name for n in before.nodes]
        assert await transfers(cluster, names, 10, seed=5) > 0
        assert await total(cluster, names) == 100 * len(names)
        await assert_replicas_equal(local)


def test_verify_reports_differing_replicas_and_stale_epochs() -> None:
    from txrpc._ring_cli import compare_digests
    from txrpc._shardmap import NodeSpec, ShardMap

    shard_map = ShardMap.build(
        [NodeSpec(f"n{i}", "127.0.0.1", 7700 + i) for i in range(3)], replication_factor=3, partitions=4
    )
    same = {"epoch": 1, "in_doubt": 0, "partitions": [[0, 2, "aa"], [3, 1, "bb"]]}
    differs = {"epoch": 1, "in_doubt": 0, "partitions": [[0, 2, "aa"], [3, 1, "cc"]]}
    stale = {"epoch": 0, "in_doubt": 0, "partitions": [[0, 9, "zz"]]}
    agree = compare_digests(shard_map, {"n0": same, "n1": same, "n2": "unreachable"})
    assert agree.differences == [] and agree.partitions_compared == 2
    report = compare_digests(shard_map, {"n0": same, "n1": differs, "n2": stale})
    assert [d.split(":")[0] for d in report.differences] == ["partition 3"]
    assert report.nodes_differing == {"n0", "n1"} and report.stale == ["n2"]


async def test_alarms_set_events_at_their_times_and_do_not_pile_up() -> None:
    """The primary bounds each prepare's wait for its followers with an alarm (one
    sleeping task) instead of a cancel scope: events are set at their times, a nearer
    one wakes the task, and entries of events set meanwhile are dropped, not kept."""
    from coordinator._batching import Alarms
    from txrpc._timers import REBUILD_SLACK

    alarms = Alarms()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(alarms.run)
        while not alarms.running:
            await trio.sleep(0)
        start = trio.current_time()
        far, near = trio.Event(), trio.Event()
        alarms.set_at(start + 60, far)
        alarms.set_at(start + 0.1, near)  # nearer than the one the task sleeps for
        with trio.fail_after(5):
            await near.wait()
        assert 0.1 <= trio.current_time() - start < 2
        assert not far.is_set()
        for _ in range(4 * REBUILD_SLACK):  # waits answered before their alarms
            done = trio.Event()
            alarms.set_at(trio.current_time() + 60, done)
            done.set()
        assert len(alarms) <= 2 * 2 + REBUILD_SLACK + 1  # (far, and a few since the last rebuild)
        nursery.cancel_scope.cancel()
    assert not alarms.running


async def test_a_follower_that_never_answers_fails_the_prepare_after_the_timeout(tmp_path: Path) -> None:
    """A primary's prepare waits for its followers' acknowledgements at most the
    replication timeout, by an alarm (not a cancel scope): with the batch to the
    followers never answered at all, the prepare reports each follower as silent and
    the primary goes on."""
    from _cluster_helpers import make_config

    from coordinator._replication import Replication
    from txrpc._routing import EpochGuard

    shard_map = make_config(tmp_path, 3, replication_factor=3).shard_map
    node = shard_map.nodes[0].name
    key = next(k for k in (f"k{i}" for i in range(1000)) if shard_map.primary_of(k).name == node)

    async def no_client(_: str) -> txrpc.Client:
        raise AssertionError("the batch is not sent in this test")

    replication = Replication(node, EpochGuard(shard_map, node=node), no_client, timeout_s=0.3)
    batches: list[str] = []

    async def never_answered(follower: str, epoch: int, items: list[Any], answered: Any) -> None:
        batches.append(follower)  # (its own bound is what this test takes away)
        await trio.sleep_forever()

    replication._prepare_batch = never_answered  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(replication.run)
        while not replication._alarms.running:  # (until then a cancel scope bounds the wait)
            await trio.sleep(0)
        started = trio.current_time()
        with trio.fail_after(5):
            the_plan = await replication.send_prepare(1, [(key, False, 1)], [])
        elapsed = trio.current_time() - started
        assert sorted(batches) == sorted(the_plan.by_follower) != []
        assert the_plan.failures == {f: "no answer within 0.3 s" for f in the_plan.by_follower}
        assert 0.3 <= elapsed < 3, elapsed
        nursery.cancel_scope.cancel()


async def test_a_follower_stopping_under_a_batch_answers_unavailable_without_an_error_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose storage closes under a repl.prepare_many (it is stopping: the
    simulator's crashes do this) answers each record UNAVAILABLE, holds none of them, and
    logs no error: a stop is expected (it used to log a traceback per record at ERROR)."""
    from storage import StorageClosed

    async with local_cluster(tmp_path, [bank], replication_factor=3) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        primary = shard_map.nodes[0].name
        k1, k2 = [n for n in (f"acct{i}" for i in range(5000)) if shard_map.primary_of(n).name == primary][:2]
        follower = shard_map.nodes[1].name
        store = local.participants[follower].store

        async def closed(*args: object, **kwargs: object) -> None:
            raise StorageClosed("the appender stopped before this record was written")

        monkeypatch.setattr(store, "write_prepares", closed)  # the batch's one write
        monkeypatch.setattr(store, "write_prepare", closed)  # a record on its own
        async with txrpc.connect(*shard_map.node(follower).address) as client:
            current = client.options(metadata={"epoch": shard_map.epoch})
            a, b, c = [(await cluster.coordinator.call("coord.begin", None))["txid"] for _ in range(3)]
            # a and c go in the batch's one write; b conflicts with a on k1: on its own, after a.
            records = [[a, [[k1, False, 7]]], [b, [[k1, False, 8]]], [c, [[k2, False, 9]]]]
            with caplog.at_level(logging.ERROR):
                answers = await current.call("repl.prepare_many", records, origin=primary)
        unavailable = [int(txrpc.Code.UNAVAILABLE), "the node is stopping", {}]
        assert answers[0] == unavailable and answers[2] == unavailable
        assert answers[1] in (unavailable, "PENDING"), answers  # (PENDING: past the batch's cut-off)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        with trio.fail_after(5):
            while local.participants[follower].core.in_doubt():
                await trio.sleep(0.01)
