"""Transactions across shards, in-process: coordinator + 3 shard nodes on loopback TCP,
each on its own SQLite file."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import trio
from _cluster_helpers import LocalCluster, deposits_at, load_bank_service, local_cluster
from _trio_helpers import a_real_cancelled

import storage
import txrpc
from coordinator._participant_core import TxState

bank = load_bank_service()


def accounts_on_distinct_shards(cfg: txrpc.ClusterConfig, count: int) -> list[str]:
    """Account names whose primaries cover every node (so transfers cross shards)."""
    names: list[str] = []
    by_node: dict[str, list[str]] = {}
    i = 0
    while len(names) < count:
        name = f"acct{i}"
        i += 1
        node = cfg.shard_map.primary_of(name).name
        if len(by_node.setdefault(node, [])) < (count + 2) // 3:
            by_node[node].append(name)
            names.append(name)
    return names


def _recorded_prepare_writes(monkeypatch: pytest.MonkeyPatch, fail: list[bool] | None = None) -> list[list[int]]:
    """Patch ``ShardStore.write_prepares`` (one queued write of prepare records) to record
    the txids of each call, in order; while ``fail[0]`` is set, a call raises instead of
    writing (a full disk)."""
    from storage._shard_store import ShardStore

    writes: list[list[int]] = []
    real_write = ShardStore.write_prepares

    async def recording(self: ShardStore, records: Any) -> None:
        writes.append([txid for txid, _, _, _ in records])
        if fail is not None and fail[0]:
            raise OSError("disk full (test)")
        await real_write(self, records)

    monkeypatch.setattr(ShardStore, "write_prepares", recording)
    return writes


def accounts_on_one_shard(cfg: txrpc.ClusterConfig, node: Any, count: int) -> list[str]:
    """The first ``count`` account names whose primary is ``node``."""
    names = (f"acct{i}" for i in itertools.count())
    return list(itertools.islice((n for n in names if cfg.shard_map.primary_of(n) == node), count))


async def open_accounts(cluster: txrpc.Cluster, names: list[str], balance: int) -> None:
    for name in names:
        async with cluster.transaction() as t:
            await t.bank.open_account(name, balance)


async def total(cluster: txrpc.Cluster, names: list[str]) -> int:
    return sum([await cluster.call(n, "bank.balance", n) for n in names])


async def transfer(cluster: txrpc.Cluster, src: str, dst: str, amount: int, attempts: int) -> None:
    """Move ``amount`` from ``src`` to ``dst`` in one transaction, retried on conflicts."""

    async def body(t: txrpc.Transaction) -> None:
        await t.bank.withdraw(src, amount)
        await t.bank.deposit(dst, amount)

    await cluster.run_transaction(body, attempts=attempts)


async def transfers_until_phase_two_drains(
    local: LocalCluster, cluster: txrpc.Cluster, pairs: list[tuple[str, str]], rounds: int
) -> None:
    """``rounds`` transfers of 1 along each pair, the pairs concurrently; returns once the
    coordinator has no phase-2 commit left to send (phase 2 runs after the clients hear
    "committed")."""

    async def along(src: str, dst: str) -> None:
        for _ in range(rounds):
            await transfer(cluster, src, dst, 1, attempts=50)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for src, dst in pairs:
                nursery.start_soon(along, src, dst)
    coordinator = local.coordinator
    assert coordinator is not None
    with trio.fail_after(10):
        while coordinator._commits_to_send:
            await trio.sleep(0.01)


async def test_cross_shard_transfer_commits_atomically(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        assert local.config.shard_map.primary_of(alice) != local.config.shard_map.primary_of(bob)
        await open_accounts(cluster, [alice, bob], 100)
        async with cluster.transaction() as t:
            assert await t.bank.withdraw(alice, 30) == 70
            assert await t.bank.deposit(bob, 30) == 130
        assert t.outcome == "committed" and len(t.participants) == 2
        assert await cluster.call(alice, "bank.balance", alice) == 70
        assert await cluster.call(bob, "bank.balance", bob) == 130


async def test_user_abort_rolls_back_every_shard(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 50)
        with pytest.raises(txrpc.TransactionAborted, match="insufficient funds") as info:
            async with cluster.transaction() as t:
                await t.bank.deposit(bob, 80)  # buffered on bob's shard
                await t.bank.withdraw(alice, 80)  # aborts
        assert not info.value.retryable
        assert await cluster.call(alice, "bank.balance", alice) == 50
        assert await cluster.call(bob, "bank.balance", bob) == 50  # the deposit never became visible


async def test_exception_in_the_block_aborts_and_frees_locks(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 10)
        with pytest.raises(KeyError):
            async with cluster.transaction() as t:
                await t.bank.deposit(alice, 5)
                raise KeyError("the caller's own error")
        with trio.fail_after(5):  # the lock on alice is free again
            async with cluster.transaction() as t:
                await t.bank.withdraw(alice, 10)
        assert await cluster.call(alice, "bank.balance", alice) == 0


async def test_an_operation_waiting_past_the_transaction_deadline_aborts_it(tmp_path: Path) -> None:
    """An older transaction waits for a younger one's lock (wait-die); its deadline
    passes during the wait: it ends then, aborted (retryably) with the reason, and its
    own locks are freed. (The operation's wait is bounded by the connection's deadline
    timer, not a cancel scope per call.)"""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 10)
        async with cluster.transaction() as young:
            await young.bank.deposit(alice, 1)  # holds alice's lock until it commits
            assert young.txid is not None
            started = trio.current_time()
            with pytest.raises(txrpc.TransactionAborted) as aborted:
                async with cluster.transaction(timeout_s=0.3, age=1) as old:  # older than all
                    await old.bank.deposit(bob, 5)
                    await old.bank.withdraw(alice, 5)  # waits for young (it is older)
            assert 0.3 <= trio.current_time() - started < 3
            assert "transaction deadline passed during an operation" in aborted.value.message
            assert aborted.value.details["retryable"] is True
        with trio.fail_after(5):  # bob's lock was freed by the abort
            async with cluster.transaction() as t:
                await t.bank.withdraw(bob, 10)
        assert await total(cluster, [alice, bob]) == 11  # young's deposit committed, old's did not


async def test_operations_of_one_transaction_waiting_for_one_lock_together_all_go_on(tmp_path: Path) -> None:
    """Two operations of one (older) transaction, run at once, both wait for a lock a
    younger one holds: when it commits, both go on (one wait, shared; neither's queued
    request withdrawn by the other's first try). Before, the second try withdrew the
    request and each waiter replaced the other's wake-up: both waited until the
    transaction's deadline and it aborted. A reader and a writer of the key (S, then X)
    likewise: the reader's grant does not end the writer's wait with too weak a lock."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 10)
        took: list[float] = []
        seen: list[int] = []

        olds: list[txrpc.Transaction] = []

        async def older(together: list[tuple[str, int]]) -> None:
            async with cluster.transaction(timeout_s=5, age=1) as old:  # older than all
                olds.append(old)
                async with trio.open_nursery() as operations:
                    for method, amount in together:
                        if method == "balance":
                            operations.start_soon(lambda: _append(seen, old.bank.balance(alice)))
                        else:
                            operations.start_soon(getattr(old.bank, method), alice, amount)
            took.append(trio.current_time() - released)

        for together in ([("deposit", 2), ("deposit", 3)], [("balance", 0), ("withdraw", 4)]):
            async with trio.open_nursery() as nursery:
                async with cluster.transaction() as young:
                    await young.bank.deposit(alice, 1)  # holds alice's lock until it commits
                    nursery.start_soon(older, together)
                    core = local.participants[local.config.shard_map.primary_of(alice).name].core
                    with trio.fail_after(5):  # both operations run (in tasks: they wait for the lock)
                        while not olds or getattr(core.txs.get(olds[-1].txid), "running_ops", 0) < 2:
                            await trio.sleep(0.01)
                    released = trio.current_time()
            assert len(took) == (1 if together[0][0] == "deposit" else 2) and took[-1] < 2
        assert seen in ([17], [13])  # read before or after its sibling's withdrawal
        assert await total(cluster, [alice, bob]) == 20 + 1 + 2 + 3 + 1 - 4


async def test_operations_of_one_transaction_at_one_shard_run_one_at_a_time(tmp_path: Path) -> None:
    """Operations of one transaction sent at once each run alone at a shard, as the
    statements of an SQL transaction do: two withdrawals from one account
    whose balance must be read from the database (no cached value) both count. Before,
    each read the balance while the other's read was on its worker thread, and the
    second write overwrote the first: 100 - 3 - 2 left 98."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 100)
        for participant in local.participants.values():
            participant.store._cache.clear()  # the balances are read from the database
        async with cluster.transaction() as t:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(t.bank.withdraw, alice, 3)
                nursery.start_soon(t.bank.withdraw, alice, 2)
                nursery.start_soon(t.bank.deposit, bob, 5)
        assert await cluster.call(alice, "bank.balance", alice) == 95
        assert await total(cluster, [alice, bob]) == 200
        assert all(not participant._turns for participant in local.participants.values())


async def _append(into: list[Any], value: Any) -> None:
    into.append(await value)


async def test_an_abort_before_commit_is_the_shards_business_alone(tmp_path: Path) -> None:
    """A transaction that aborts before it asks to commit tells the shards it touched and
    not the coordinator: no commit of it was ever sent, so there is nothing to refuse
    there (presumed abort), and the coordinator's copy of the shards' abort was work for
    three processes per conflict."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 10)
        coordinator = local.coordinator
        assert coordinator is not None
        with pytest.raises(KeyError):
            async with cluster.transaction() as t:
                await t.bank.deposit(alice, 5)
                await t.bank.deposit(bob, 5)
                raise KeyError("the caller's own error")
        assert t.txid is not None and coordinator.core.get(t.txid) is None  # never heard of it
        with trio.fail_after(5):  # and both locks are free again
            async with cluster.transaction() as t2:
                await t2.bank.withdraw(alice, 10)
                await t2.bank.withdraw(bob, 10)
        assert [await total(cluster, [n]) for n in (alice, bob)] == [0, 0]


def test_txid_leases_grow_for_a_busy_client_and_shrink_for_a_quiet_one() -> None:
    from txrpc._cluster import LEASE_SIZE_MAX, LEASE_SIZE_MIN, next_lease_size

    assert next_lease_size(16, None) == 16  # the first lease
    assert next_lease_size(16, 0.01) == 32  # used up fast: twice as big
    assert next_lease_size(16, 1.0) == 16  # as fast as intended: the same
    assert next_lease_size(64, 60.0) == 32  # slow: half
    assert next_lease_size(LEASE_SIZE_MAX, 0.0) == LEASE_SIZE_MAX  # bounded both ways
    assert next_lease_size(LEASE_SIZE_MIN, 60.0) == LEASE_SIZE_MIN


async def test_a_busy_client_leases_txids_in_bigger_blocks(tmp_path: Path) -> None:
    """Beginning transactions fast, a client asks the coordinator for ids a few times,
    not once per 16 transactions (every task wanting an id waits for that round trip)."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 8)
        await open_accounts(cluster, names, 0)
        leases: list[int] = []
        real_call = cluster.coordinator.call

        async def counting_call(method: str, /, *args: Any, **kwargs: Any) -> Any:
            if method == "coord.lease":
                leases.append(args[0])
            return await real_call(method, *args, **kwargs)

        cluster.coordinator.call = counting_call  # type: ignore[method-assign]
        txids = []

        async def deposit(name: str, count: int) -> None:
            for _ in range(count):
                async with cluster.transaction() as t:
                    await t.bank.deposit(name, 1)
                txids.append(t.txid)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(deposit, name, 50)
        assert await total(cluster, names) == 400
        assert len(set(txids)) == 400  # unique ids
        # 16, 32, 64, 128, 256 cover 400 ids if every lease lasts under LEASE_FAST_S; a
        # slow moment keeps one size for a lease more. At 16 ids each: 25 leases.
        assert len(leases) <= 9, leases
        assert leases == sorted(leases) and leases[-1] > 16 and max(leases) <= 256


async def test_ids_held_too_long_are_dropped_for_a_fresh_smaller_lease(tmp_path: Path) -> None:
    """A client that was busy and went quiet does not begin its later transactions with
    ids leased long ago (wait-die would rank them older than they are)."""
    from txrpc._cluster import LEASE_SLOW_S

    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        await open_accounts(cluster, [alice], 0)
        cluster._forget_lease()
        cluster.txid_lease_size = 64  # the next lease: 64 ids
        async with cluster.transaction() as t:
            await t.bank.deposit(alice, 1)
        assert t.txid is not None and len(cluster._leased) == 63
        assert cluster._leased_at is not None
        cluster._leased_at -= LEASE_SLOW_S + 1  # as if the lease had been taken long ago
        async with cluster.transaction() as t2:
            await t2.bank.deposit(alice, 1)
        assert t2.txid is not None and t2.txid > t.txid + 63  # from a new lease
        assert cluster.txid_lease_size == 32  # halved: it lasted long


async def test_single_shard_transaction_commits_in_one_phase(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        await open_accounts(cluster, [alice], 10)
        node = local.config.shard_map.primary_of(alice).name
        before = (await local.participants[node].store.digest())[0]
        async with cluster.transaction() as t:
            await t.bank.deposit(alice, 5)
            await t.bank.deposit(alice, 5)
        assert t.participants == {node}
        assert await cluster.call(alice, "bank.balance", alice) == 20
        assert (await local.participants[node].store.digest())[0] == before + 1  # one commit-log entry
        assert local.coordinator is not None
        assert await local.coordinator.log.get(t.txid) is None  # one-phase: no coordinator record


async def test_concurrent_transfers_conserve_the_total(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 6)
        await open_accounts(cluster, names, 100)
        rng = random.Random(7)
        committed = 0

        async def worker(seed: int) -> None:
            nonlocal committed
            r = random.Random(seed)
            for _ in range(15):
                src, dst = r.sample(names, 2)
                amount = r.randint(1, 30)
                try:
                    await transfer(cluster, src, dst, amount, attempts=20)
                    committed += 1
                except txrpc.TransactionAborted as exc:
                    assert "insufficient funds" in exc.reason

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _k in range(8):
                    nursery.start_soon(worker, rng.randrange(1 << 30))
        assert committed > 0
        balances = [await cluster.call(n, "bank.balance", n) for n in names]
        assert sum(balances) == 600
        assert min(balances) >= 0


async def test_opposite_transfers_do_not_deadlock(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        a, b = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [a, b], 1000)

        async def ping_pong(src: str, dst: str) -> None:
            for _ in range(20):
                await transfer(cluster, src, dst, 1, attempts=100)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(ping_pong, a, b)
                    nursery.start_soon(ping_pong, b, a)
        assert await total(cluster, [a, b]) == 2000


async def test_vanished_client_locks_are_freed_after_idle_timeout(tmp_path: Path) -> None:
    async with (
        local_cluster(tmp_path, [bank], shard={"tx_idle_timeout_s": 0.5}) as local,
        txrpc.cluster(local.config) as cluster,
    ):
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        await open_accounts(cluster, [alice], 10)
        # A client that begins, writes, and vanishes without commit or abort.
        info = await cluster.coordinator.call("coord.begin", None)
        node = local.config.shard_map.primary_of(alice)
        async with txrpc.connect(*node.address) as raw:
            meta = {"txid": info["txid"], "op_seq": 1, "epoch": local.config.shard_map.epoch}
            await raw.options(metadata=meta).call("bank.deposit", alice, 5)

        # The abandoned lock blocks (an older transaction waits, a younger one dies and is
        # retried) until the shard's idle timeout aborts the vanished transaction.
        async def withdraw_all(t: txrpc.Transaction) -> None:
            await t.bank.withdraw(alice, 10)

        with trio.fail_after(10):
            await cluster.run_transaction(withdraw_all, attempts=100)
        assert await cluster.call(alice, "bank.balance", alice) == 0  # the vanished deposit never happened


async def test_duplicate_and_late_protocol_messages_are_harmless(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 10)
        info = await cluster.coordinator.call("coord.begin", None)
        txid = info["txid"]
        epoch = local.config.shard_map.epoch
        clients = {}
        async with trio.open_nursery():
            for name in (alice, bob):
                node = local.config.shard_map.primary_of(name)
                clients[name] = txrpc.connect(*node.address)
            async with clients[alice] as ca, clients[bob] as cb:
                meta = {"txid": txid, "op_seq": 1, "epoch": epoch}
                assert await ca.options(metadata=meta).call("bank.withdraw", alice, 4) == 6
                # The same operation again (a retried request) replays, it does not run twice.
                assert await ca.options(metadata=meta).call("bank.withdraw", alice, 4) == 6
                assert await cb.options(metadata=meta).call("bank.deposit", bob, 4) == 14
                for _ in range(2):  # duplicated prepare
                    assert (await ca.call("tx.prepare", txid))["vote"] == "yes"
                    assert (await cb.call("tx.prepare", txid))["vote"] == "yes"
                for _ in range(2):  # duplicated commit
                    assert await ca.call("tx.commit", txid) == "ok"
                    assert await cb.call("tx.commit", txid) == "ok"
                # A late prepare after commit, and a prepare for an unknown transaction.
                assert (await ca.call("tx.prepare", txid))["vote"] == "yes"
                assert (await ca.call("tx.prepare", 999_999))["vote"] == "no"
                # Abort then a late prepare: votes no.
                info2 = await cluster.coordinator.call("coord.begin", None)
                meta2 = {"txid": info2["txid"], "op_seq": 1, "epoch": epoch}
                await ca.options(metadata=meta2).call("bank.deposit", alice, 1)
                assert await ca.call("tx.abort", info2["txid"]) == "ok"
                assert await ca.call("tx.abort", info2["txid"]) == "ok"
                assert (await ca.call("tx.prepare", info2["txid"]))["vote"] == "no"
        assert await cluster.call(alice, "bank.balance", alice) == 6
        assert await cluster.call(bob, "bank.balance", bob) == 14


async def test_commit_many_answers_each_transaction(tmp_path: Path) -> None:
    """tx.commit_many (phase 2, batched): each txid committed as by tx.commit, answered
    in order; a transaction not prepared there gets its own error, the others commit
    (those prepared there together, as one write)."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        names = accounts_on_one_shard(local.config, node, 2)
        await open_accounts(cluster, names, 10)
        epoch = shard_map.epoch
        async with txrpc.connect(*node.address) as shard:
            txids = []
            for name, amount in zip(names, (1, 2), strict=True):  # two accounts: no lock conflict
                txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
                meta = {"txid": txid, "op_seq": 1, "epoch": epoch}
                await shard.options(metadata=meta).call("bank.deposit", name, amount)
                assert (await shard.call("tx.prepare", txid))["vote"] == "yes"
                txids.append(txid)
            participant = local.participants[node.name]
            store = participant.store
            real_apply = store.apply_commits
            groups: list[int] = []

            async def apply_commits(commits: Any) -> list[int]:
                groups.append(len(commits))
                return await real_apply(commits)

            store.apply_commits = apply_commits  # type: ignore[method-assign]
            answers = await shard.call("tx.commit_many", [txids[0], 999_999, txids[1]])
            assert answers[0] == answers[2] == "ok"
            assert answers[1].startswith("FAILED_PRECONDITION") and "not prepared" in answers[1]
            assert groups == [2]  # the two prepared ones: applied as one write
            assert await shard.call("tx.commit_many", txids) == ["ok", "ok"]  # idempotent
            # A commit that fails in an unexpected way is that txid's answer, not the batch's.
            real_commit = participant.commit

            async def failing(txid: int) -> str:
                if txid == txids[0]:
                    raise RuntimeError("disk on fire")
                return await real_commit(txid)

            participant.commit = failing  # type: ignore[method-assign]
            try:
                answers = await shard.call("tx.commit_many", txids)
            finally:
                participant.commit = real_commit  # type: ignore[method-assign]
            assert answers[0].startswith("INTERNAL") and "disk on fire" in answers[0] and answers[1] == "ok"
            for bad in ([], [0], [txids[0], txids[0]], ["1"], list(range(1, 2000))):
                with pytest.raises(txrpc.InvalidArgument):
                    await shard.call("tx.commit_many", bad)
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [11, 12]


async def test_a_commit_cut_short_by_a_stop_is_unavailable_and_no_error_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A phase-2 commit whose write is rolled back because the shard is stopping under it
    (the batch's write cancelled) answers UNAVAILABLE, logs no error (a stop is expected:
    it used to log a traceback at ERROR) and stays prepared: the coordinator's retry commits it."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        names = accounts_on_one_shard(local.config, node, 2)
        await open_accounts(cluster, names, 10)
        async with txrpc.connect(*node.address) as shard:
            txids = await deposits_at(cluster, shard, names, shard_map.epoch, 5)
            for txid in txids:
                assert (await shard.call("tx.prepare", txid))["vote"] == "yes"
            store = local.participants[node.name].store
            real_apply = store.apply_commits
            cancelled = await a_real_cancelled()

            async def stopped(commits: Any) -> list[int]:
                failure = storage.BatchFailed("group commit of 1 records failed, rolled back", outcome_unknown=False)
                failure.__cause__ = cancelled
                raise failure

            store.apply_commits = stopped  # type: ignore[method-assign]
            try:
                # (On the logger itself: another test's `txrpc sim` sets txrpc's level to ERROR.)
                with caplog.at_level(logging.INFO, logger="txrpc.participant"):
                    answers = await shard.call("tx.commit_many", txids)
            finally:
                store.apply_commits = real_apply  # type: ignore[method-assign]
            assert answers == ["UNAVAILABLE: the shard is stopping"] * 2
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
            assert "the node is stopping" in caplog.text
            assert await shard.call("tx.commit_many", txids) == ["ok", "ok"]  # still prepared: the retry commits
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [15, 15]


async def test_prepare_many_answers_each_transaction(tmp_path: Path) -> None:
    """tx.prepare_many (phase 1, batched): each txid prepared as by tx.prepare, answered
    in order with its vote; an unknown txid votes no, an unexpected failure is that
    txid's answer (a string), not the batch's."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        names = accounts_on_one_shard(local.config, node, 3)
        await open_accounts(cluster, names, 10)
        epoch = shard_map.epoch
        async with txrpc.connect(*node.address) as shard:
            txids = []
            for name in names:  # three accounts: no lock conflict
                txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
                meta = {"txid": txid, "op_seq": 1, "epoch": epoch}
                await shard.options(metadata=meta).call("bank.deposit", name, 1)
                txids.append(txid)
            participant = local.participants[node.name]
            real_prepare = participant.core.prepare

            def failing(txid: int) -> Any:
                if txid == txids[2]:
                    raise RuntimeError("disk on fire")
                return real_prepare(txid)

            participant.core.prepare = failing  # type: ignore[method-assign]
            try:
                answers = await shard.call("tx.prepare_many", [txids[0], 999_999, txids[1], txids[2]])
            finally:
                participant.core.prepare = real_prepare  # type: ignore[method-assign]
            assert answers[0] == answers[2] == {"vote": "yes", "reason": ""}
            assert answers[1]["vote"] == "no"
            assert answers[3].startswith("INTERNAL") and "disk on fire" in answers[3]
            assert participant.core.txs[txids[0]].state is TxState.PREPARED
            assert participant.core.txs[txids[2]].state is TxState.ACTIVE  # its prepare never ran
            for bad in ([], [0], [txids[0], txids[0]], ["1"], list(range(1, 2000))):
                with pytest.raises(txrpc.InvalidArgument):
                    await shard.call("tx.prepare_many", bad)
            assert await shard.call("tx.commit_many", txids[:2]) == ["ok", "ok"]
            assert await shard.call("tx.abort", txids[2]) == "ok"
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [11, 11, 10]


async def _begin_deposits(cluster: txrpc.Cluster, shard: txrpc.Client, names: list[str], epoch: int) -> list[int]:
    """One transaction per name, each depositing 1 there (no prepare yet)."""
    txids = []
    for name in names:
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
        await shard.options(metadata={"txid": txid, "op_seq": 1, "epoch": epoch}).call("bank.deposit", name, 1)
        txids.append(txid)
    return txids


async def test_a_batchs_prepare_records_are_written_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreplicated shard votes on a tx.prepare_many batch at once and writes the
    prepare records of those that need one as one queued write; a read-only or unknown
    transaction is answered without one. If that write fails, each of them votes no and
    is aborted there (its locks freed: the next transaction on its key goes on)."""
    fail = [False]
    writes = _recorded_prepare_writes(monkeypatch, fail)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        names = accounts_on_one_shard(local.config, node, 5)
        await open_accounts(cluster, names, 10)
        participant = local.participants[node.name]
        async with txrpc.connect(*node.address) as shard:
            t0, t1, t2 = await _begin_deposits(cluster, shard, names[:3], shard_map.epoch)
            reader = (await cluster.coordinator.call("coord.begin", None))["txid"]
            meta = {"txid": reader, "op_seq": 1, "epoch": shard_map.epoch}
            assert await shard.options(metadata=meta).call("bank.balance", names[4]) == 10
            writes.clear()
            answers = await shard.call("tx.prepare_many", [t0, t1, reader, 999_999, t2])
            yes = {"vote": "yes", "reason": ""}
            assert answers[:3] == [yes, yes, {"vote": "read_only", "reason": ""}] and answers[4] == yes
            assert answers[3]["vote"] == "no"
            assert writes == [[t0, t1, t2]]  # one write for the three records
            assert all(participant.core.txs[t].state is TxState.PREPARED for t in (t0, t1, t2))
            assert await shard.call("tx.commit_many", [t0, t1, t2]) == ["ok", "ok", "ok"]

            t3, t4 = await _begin_deposits(cluster, shard, names[3:5], shard_map.epoch)
            fail[0] = True
            answers = await shard.call("tx.prepare_many", [t3, t4])
            fail[0] = False
            assert [a["vote"] for a in answers] == ["no", "no"]
            assert all("prepare record not durable" in a["reason"] and "disk full" in a["reason"] for a in answers)
            assert t3 not in participant.core.txs and t4 not in participant.core.txs
            assert participant._busy == {}
            (t5,) = await _begin_deposits(cluster, shard, names[3:4], shard_map.epoch)  # its lock is free
            assert await shard.call("tx.prepare_many", [t5]) == [yes]
            assert await shard.call("tx.commit_many", [t5]) == ["ok"]
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [11, 11, 11, 11, 10]


async def _records_on_disk(participant: Any) -> set[int]:
    """The txids of the shard's prepare records in its database."""
    import sqlalchemy as sa

    from storage._txn_schema import prepared

    def read(conn: Any) -> set[int]:
        query = sa.select(prepared.c.txid).where(prepared.c.shard == participant.store.shard)
        return {int(row.txid) for row in conn.execute(query)}

    return await participant.store.database.read(read)  # type: ignore[no-any-return]


async def test_a_prepare_record_whose_write_outcome_is_unknown_is_dropped_before_its_locks_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prepare record's write fails during COMMIT (outcome unknown: it may be on disk).
    The transaction votes no, and its record is dropped before its locks are freed --
    left there, a conflicting transaction could prepare on the freed locks and a restart
    would find two records holding conflicting locks. If the drop fails too, it stays
    prepared (locks held) until its abort, which drops the record."""
    from storage import BatchFailed
    from storage._shard_store import ShardStore

    unknown = [False]
    drop_fails = [False]
    real_write, real_drop = ShardStore.write_prepares, ShardStore.delete_prepare

    async def written_then_unknown(self: ShardStore, records: Any) -> None:
        await real_write(self, records)  # on disk...
        if unknown[0]:
            raise BatchFailed("I/O error during COMMIT (test)", outcome_unknown=True)  # ...or not?

    async def drop(self: ShardStore, txid: int) -> None:
        if drop_fails[0]:
            raise OSError("disk gone (test)")
        await real_drop(self, txid)

    monkeypatch.setattr(ShardStore, "write_prepares", written_then_unknown)
    monkeypatch.setattr(ShardStore, "delete_prepare", drop)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        names = accounts_on_one_shard(local.config, node, 2)
        await open_accounts(cluster, names, 10)
        participant = local.participants[node.name]
        async with txrpc.connect(*node.address) as shard:
            for method in ("tx.prepare_many", "tx.prepare"):  # the batch's group write, and one alone
                txids = await _begin_deposits(cluster, shard, names, shard_map.epoch)
                unknown[0] = True
                if method == "tx.prepare_many":
                    answers = await shard.call(method, txids)
                else:
                    answers = [await shard.call(method, t) for t in txids]
                unknown[0] = False
                assert [a["vote"] for a in answers] == ["no", "no"], answers
                assert all("I/O error during COMMIT" in a["reason"] for a in answers)
                assert not set(txids) & await _records_on_disk(participant)  # dropped
                assert not any(t in participant.core.txs for t in txids)  # aborted, locks freed
            txids = await _begin_deposits(cluster, shard, names[:1], shard_map.epoch)
            unknown[0] = drop_fails[0] = True
            (answer,) = await shard.call("tx.prepare_many", txids)
            unknown[0] = drop_fails[0] = False
            assert answer["vote"] == "no"
            assert set(txids) <= await _records_on_disk(participant)  # still there...
            assert participant.core.txs[txids[0]].state is TxState.PREPARED  # ...so its locks are held
            assert participant.core.locks.held_by(txids[0])
            assert await shard.call("tx.abort", txids[0]) == "ok"
            assert not set(txids) & await _records_on_disk(participant)
            assert participant.core.locks.held_by(txids[0]) == {}
            again = await _begin_deposits(cluster, shard, names, shard_map.epoch)
            assert [a["vote"] for a in await shard.call("tx.prepare_many", again)] == ["yes", "yes"]
            assert await shard.call("tx.commit_many", again) == ["ok", "ok"]
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [11, 11]


async def test_at_most_256_prepare_records_go_together_the_rest_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's records are written together up to GROUP_RECORDS_MAX (256; the
    appender bounds its batches by queued writes), the rest of the batch one by one."""
    writes = _recorded_prepare_writes(monkeypatch)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        names = accounts_on_one_shard(local.config, node, 260)
        await open_accounts(cluster, names, 10)
        async with txrpc.connect(*node.address) as shard:
            txids = await _begin_deposits(cluster, shard, names, shard_map.epoch)
            writes.clear()
            answers = await shard.call("tx.prepare_many", txids)
            assert {a if a == "PENDING" else a["vote"] for a in answers} <= {"yes", "PENDING"}
            with trio.fail_after(10):
                while sum(map(len, writes)) < len(txids):
                    await trio.sleep(0.05)
            assert sorted(map(len, writes)) == [1] * (len(txids) - 256) + [256]
            assert await shard.call("tx.commit_many", txids) == ["ok"] * len(txids)
        assert {await cluster.call(n, "bank.balance", n) for n in names} == {11}


async def test_a_slow_or_failed_prepare_batch_answers_pending_or_aborts_what_it_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch with a transaction that another message is writing (it goes on its own,
    waiting for that write) and a record write that outlasts the cut-off answers PENDING
    for each (asked alone, each waits for its write and gets its vote); a batch that fails
    before its write starts aborts what it took (nothing written, nothing busy, no lock
    held)."""
    import coordinator._participant as participant_module
    from coordinator import Participant
    from storage._shard_store import ShardStore

    monkeypatch.setattr(participant_module, "BATCH_ANSWER_S", 0.2)
    slow = [0.0]
    real_write = ShardStore.write_prepares

    async def sometimes_slow(self: ShardStore, records: Any) -> None:
        await trio.sleep(slow[0])
        await real_write(self, records)

    monkeypatch.setattr(ShardStore, "write_prepares", sometimes_slow)
    real_each = Participant._each_answered
    fail = [False]

    async def sometimes_failing(self: Participant, items: Any, one: Any, group: Any = None) -> list[Any]:
        if fail[0] and group is not None:
            raise RuntimeError("the batch failed before its write started (test)")
        return await real_each(self, items, one, group)

    monkeypatch.setattr(Participant, "_each_answered", sometimes_failing)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        *names, other = accounts_on_one_shard(local.config, node, 3)
        await open_accounts(cluster, [*names, other], 10)
        participant = local.participants[node.name]
        async with txrpc.connect(*node.address) as shard:
            txids = await _begin_deposits(cluster, shard, names, shard_map.epoch)
            reader = (await cluster.coordinator.call("coord.begin", None))["txid"]
            meta = {"txid": reader, "op_seq": 1, "epoch": shard_map.epoch}
            assert await shard.options(metadata=meta).call("bank.balance", other) == 10
            slow[0] = 1.0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(shard.call, "tx.prepare", txids[0])  # writing txids[0] (slowly)
                with trio.fail_after(5):
                    while txids[0] not in participant._busy:
                        await trio.sleep(0.01)
                started = trio.current_time()
                answers = await shard.call("tx.prepare_many", [*txids, reader])
                # The read-only vote needs no record: answered at once, not held back.
                assert answers == ["PENDING", "PENDING", {"vote": "read_only", "reason": ""}]
                assert trio.current_time() - started < 0.9
            slow[0] = 0.0
            assert [(await shard.call("tx.prepare", t))["vote"] for t in txids] == ["yes", "yes"]
            assert await shard.call("tx.commit_many", txids) == ["ok", "ok"]

            txids = await _begin_deposits(cluster, shard, names, shard_map.epoch)
            fail[0] = True
            with pytest.raises(txrpc.Internal):
                await shard.options(retries_max=0).call("tx.prepare_many", txids)
            fail[0] = False
            assert not any(t in participant.core.txs for t in txids) and participant._busy == {}
            assert participant.core.locks.held_by(txids[0]) == {}
            again = await _begin_deposits(cluster, shard, names, shard_map.epoch)  # the keys are free
            assert [a["vote"] for a in await shard.call("tx.prepare_many", again)] == ["yes", "yes"]
            assert await shard.call("tx.commit_many", again) == ["ok", "ok"]
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [12, 12]


async def test_one_slow_prepare_does_not_hold_back_the_others_in_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tx.prepare_many answers by its cut-off: a prepare still running then is answered
    PENDING and finishes in the background; asking for it alone (what the coordinator
    does) gets its vote."""
    import coordinator._participant as participant_module
    from coordinator import Participant

    monkeypatch.setattr(participant_module, "BATCH_ANSWER_S", 0.2)
    # Each prepare on its own, as on a replicated shard (where one may wait for a slow
    # follower): an unreplicated shard writes a batch's records together (one write,
    # slow or not for all: test_a_batchs_prepare_records_are_written_together).
    monkeypatch.setattr(Participant, "_take_prepares", lambda self, txids, voted: None)
    slow: set[int] = set()
    real_prepare = Participant.prepare

    async def sometimes_slow(self: Participant, txid: int) -> dict[str, Any]:
        if txid in slow:
            await trio.sleep(2.0)
        return await real_prepare(self, txid)

    monkeypatch.setattr(Participant, "prepare", sometimes_slow)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        shard_map = local.config.shard_map
        node = shard_map.primary_of("acct0")
        names = accounts_on_one_shard(local.config, node, 2)
        await open_accounts(cluster, names, 10)
        async with txrpc.connect(*node.address) as shard:
            txids = await deposits_at(cluster, shard, names, shard_map.epoch, 1)
            slow.add(txids[1])
            started = trio.current_time()
            answers = await shard.call("tx.prepare_many", txids)
            assert trio.current_time() - started < 1.5
            assert answers == [{"vote": "yes", "reason": ""}, "PENDING"]
            slow.clear()
            assert (await shard.call("tx.prepare", txids[1]))["vote"] == "yes"  # asked alone
            await trio.sleep(2.0)  # the background prepare finishes too (a re-prepare: yes)
            assert local.participants[node.name].core.txs[txids[1]].state is TxState.PREPARED
            assert await shard.call("tx.commit_many", txids) == ["ok", "ok"]
        assert [await cluster.call(n, "bank.balance", n) for n in names] == [11, 11]


async def test_a_failing_prepare_sender_aborts_its_transactions_and_the_coordinator_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong in a prepare sender (here an unexpected error, not an
    RpcError), every transaction of its batch gets a vote at once -- unreachable, abort --
    and the coordinator keeps serving: the next transfer commits."""
    from coordinator import Coordinator

    real_call = Coordinator._participant_call
    broken = [True]

    async def sometimes_broken(self: Coordinator, participant: str, method: str, *args: Any, **kw: Any) -> Any:
        if method == "tx.prepare_many" and broken[0]:
            raise RuntimeError("a bug in the sender")
        return await real_call(self, participant, method, *args, **kw)

    monkeypatch.setattr(Coordinator, "_participant_call", sometimes_broken)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 10)
        started = trio.current_time()
        with pytest.raises(txrpc.TransactionAborted, match="a bug in the sender"):
            await transfer(cluster, alice, bob, 1, attempts=1)
        assert trio.current_time() - started < 2.0  # at once, not after a timeout
        broken[0] = False
        await transfer(cluster, alice, bob, 1, attempts=5)
        assert [await cluster.call(n, "bank.balance", n) for n in (alice, bob)] == [9, 11]


async def test_prepares_are_batched_per_participant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent cross-shard commits reach each shard's phase 1 as tx.prepare_many
    batches (fewer messages than transactions), each transaction's prepare record
    written there once."""
    from coordinator import Participant

    sizes: list[int] = []
    real_many = Participant.prepare_many

    async def counting_many(self: Participant, txids: list[int]) -> list[Any]:
        sizes.append(len(txids))
        return await real_many(self, txids)

    monkeypatch.setattr(Participant, "prepare_many", counting_many)
    writes = _recorded_prepare_writes(monkeypatch)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 24)
        await open_accounts(cluster, names, 100)
        pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(0, len(names), 2)]
        sizes.clear()
        writes.clear()
        await transfers_until_phase_two_drains(local, cluster, pairs, 10)
        primary = local.config.shard_map.primary_of
        cross = [(s, d) for s, d in pairs if primary(s) != primary(d)]
        prepared = [txid for write in writes for txid in write]
        assert sum(sizes) == len(prepared) == 2 * 10 * len(cross)  # each reached both its shards once
        assert len(set(prepared)) == 10 * len(cross)
        assert max(sizes) > 1 and len(sizes) < sum(sizes)
        balances = [await cluster.call(n, "bank.balance", n) for n in names]
        assert sum(balances) == 100 * len(names)


async def test_one_prepare_message_per_participant_is_in_flight_the_rest_queue_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a participant has not answered a tx.prepare_many, the prepares queued for it
    meanwhile wait and leave together in the next one when it answers (never two in
    flight to one participant): under load the batches grow by themselves, and a
    message and a handler run at the shard serve many transactions."""
    from coordinator import Participant

    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}
    sizes: list[int] = []
    real_many = Participant.prepare_many

    async def slow_many(self: Participant, txids: list[int]) -> list[Any]:
        in_flight[self.shard] = in_flight.get(self.shard, 0) + 1
        most[self.shard] = max(most.get(self.shard, 0), in_flight[self.shard])
        sizes.append(len(txids))
        try:
            await trio.sleep(0.02)  # prepares queued meanwhile must wait for this answer
            return await real_many(self, txids)
        finally:
            in_flight[self.shard] -= 1

    monkeypatch.setattr(Participant, "prepare_many", slow_many)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 24)
        await open_accounts(cluster, names, 100)
        pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(0, len(names), 2)]
        sizes.clear()
        most.clear()
        await transfers_until_phase_two_drains(local, cluster, pairs, 5)
        assert most and set(most.values()) == {1}, most
        assert max(sizes) > 2 and len(sizes) < sum(sizes)  # the waiting ones went together
        balances = [await cluster.call(n, "bank.balance", n) for n in names]
        assert sum(balances) == 100 * len(names)


async def test_phase_two_commits_are_batched_per_participant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent cross-shard commits reach each shard as tx.commit_many batches (fewer
    messages than transactions), and every transaction is committed exactly once."""
    from coordinator import Participant

    sizes: list[int] = []
    real = Participant.commit_many

    async def counting(self: Participant, txids: list[int]) -> list[str]:
        sizes.append(len(txids))
        return await real(self, txids)

    monkeypatch.setattr(Participant, "commit_many", counting)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 24)
        await open_accounts(cluster, names, 100)
        pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(0, len(names), 2)]
        sizes.clear()
        await transfers_until_phase_two_drains(local, cluster, pairs, 10)
        primary = local.config.shard_map.primary_of
        cross = [(s, d) for s, d in pairs if primary(s) != primary(d)]
        assert sum(sizes) == 2 * 10 * len(cross)  # each cross-shard commit reached both shards once
        assert max(sizes) > 1 and len(sizes) < sum(sizes)
        balances = [await cluster.call(n, "bank.balance", n) for n in names]
        assert sum(balances) == 100 * len(names)


async def test_phase_two_sender_does_not_back_off_while_another_shard_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard that acknowledged its share of a commit while the other shard has not yet
    is not a refusal: the sender goes straight on with the next batch (no backoff sleep;
    an earlier version paused there, throttling phase 2 to the slowest shard)."""
    from coordinator import Coordinator, Participant

    backoffs: list[int] = []
    real_backoff = Coordinator._backoff
    real_commit = Participant.commit

    def counting_backoff(self: Coordinator, attempt: int) -> float:
        backoffs.append(attempt)
        return real_backoff(self, attempt)

    async def slow_on_n1(self: Participant, txid: int) -> str:
        if self.shard == "n1":
            await trio.sleep(0.05)
        return await real_commit(self, txid)

    monkeypatch.setattr(Coordinator, "_backoff", counting_backoff)
    monkeypatch.setattr(Participant, "commit", slow_on_n1)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 12)
        await open_accounts(cluster, names, 100)
        primary = local.config.shard_map.primary_of
        pairs = [(a, b) for a in names for b in names if {primary(a).name, primary(b).name} == {"n0", "n1"}][:6]
        assert pairs
        backoffs.clear()
        await transfers_until_phase_two_drains(local, cluster, pairs, 5)
        assert backoffs == []  # nothing was refused: no sender slept


@pytest.mark.parametrize(("batched", "single"), [("tx.prepare_many", "prepare"), ("tx.commit_many", "commit")])
async def test_a_shard_without_a_batched_message_gets_single_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: str, single: str
) -> None:
    """Phase 1 or 2 against a shard of an older version (no tx.prepare_many /
    tx.commit_many: UNIMPLEMENTED): the coordinator falls back to one tx.prepare /
    tx.commit per transaction, and every cross-shard transfer still commits exactly once
    on both shards."""
    from coordinator import Participant

    real_service = Participant._internal_service
    singles: list[int] = []
    real_step = getattr(Participant, single)

    def older(self: Participant) -> txrpc.Service:
        svc = real_service(self)
        del svc.methods[batched]  # as a shard built before the batched message existed
        return svc

    async def counting(self: Participant, txid: int) -> Any:
        singles.append(txid)
        return await real_step(self, txid)

    monkeypatch.setattr(Participant, "_internal_service", older)
    monkeypatch.setattr(Participant, single, counting)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 6)
        await open_accounts(cluster, names, 100)
        pairs = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]
        primary = local.config.shard_map.primary_of
        cross = [(s, d) for s, d in pairs if primary(s) != primary(d)]
        assert cross
        singles.clear()
        await transfers_until_phase_two_drains(local, cluster, cross, 1)
        # Each committed cross-shard transfer reached both its shards as a single message.
        assert len(singles) == 2 * len(cross)
        assert len(set(singles)) == len(cross)
        expected = {n: 100 - sum(s == n for s, _ in cross) + sum(d == n for _, d in cross) for n in names}
        assert {n: await cluster.call(n, "bank.balance", n) for n in names} == expected


async def test_commit_is_idempotent_and_unknown_txids_are_aborted(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        alice, bob = accounts_on_distinct_shards(local.config, 2)
        await open_accounts(cluster, [alice, bob], 10)
        async with cluster.transaction() as t:
            await t.bank.withdraw(alice, 1)
            await t.bank.deposit(bob, 1)
        again = await cluster.coordinator.call("coord.commit", t.txid, sorted(t.participants))
        assert again["outcome"] == "committed"
        with pytest.raises(txrpc.Aborted, match="unknown"):
            await cluster.coordinator.call("coord.commit", 10**9, [])
        assert await cluster.outcome(t.txid) == "committed"
        assert await cluster.outcome(t.txid, sorted(t.participants)) == "committed"  # the coordinator's record
        assert await cluster.outcome(10**9) == "aborted"
        assert await cluster.outcome(10**9, sorted(t.participants)) == "aborted"  # presumed abort


async def test_wrong_epoch_is_refused_before_anything_runs(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        await open_accounts(cluster, [alice], 10)
        node = local.config.shard_map.primary_of(alice)
        async with txrpc.connect(*node.address) as raw:
            with pytest.raises(txrpc.WrongEpoch) as info:
                await raw.options(metadata={"epoch": 99}).call("bank.deposit", alice, 5)
            assert info.value.details["epoch"] == local.config.shard_map.epoch
        assert await cluster.call(alice, "bank.balance", alice) == 10


@pytest.mark.postgres
async def test_coordinator_log_and_shard_stores_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    """Same protocol, PostgreSQL underneath: concurrent transfers, then a shard crashes
    (task tree cancelled, memory dropped) and restarts from what PostgreSQL kept."""
    options = {"coordinator": {"db_url": postgres_url}, "shard": {"db_url": postgres_url}}
    async with local_cluster(tmp_path, [bank], **options) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 6)
        await open_accounts(cluster, names, 100)

        async def worker(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(10):
                src, dst = r.sample(names, 2)
                await transfer(cluster, src, dst, 5, attempts=50)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for k in range(4):
                    nursery.start_soon(worker, k)
        before = {n: await cluster.call(n, "bank.balance", n) for n in names}
        assert sum(before.values()) == 600
        node = local.config.shard_map.primary_of(names[0]).name
        local.crash(node)
        await trio.sleep(0.1)
        await local.start_shard(node)
        after = {n: await cluster.call(n, "bank.balance", n) for n in names}
        assert after == before


async def test_a_later_operation_of_a_transaction_lost_by_a_restart_is_refused(tmp_path: Path) -> None:
    """A shard that restarted (losing an active transaction's writes) must not let a
    later operation start the transaction afresh: it would commit without them."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        await open_accounts(cluster, [alice], 10)
        node = local.config.shard_map.primary_of(alice).name
        with pytest.raises(txrpc.TransactionAborted, match="lost its earlier operations"):
            async with cluster.transaction() as t:
                await t.bank.deposit(alice, 5)  # op 1 on this shard
                local.crash(node)
                await trio.sleep(0.1)
                await local.start_shard(node)
                await t.bank.deposit(alice, 7)  # op 2: the shard no longer knows op 1
        assert await cluster.call(alice, "bank.balance", alice) == 10


async def test_finished_commits_get_their_done_marks(tmp_path: Path) -> None:
    """Once every participant acknowledged phase 2, the decision record is marked done
    (queued without a task per mark), so a restart does not re-drive it."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        names = accounts_on_distinct_shards(local.config, 4)
        await open_accounts(cluster, names, 100)
        pairs = [(names[0], names[1]), (names[2], names[3])]
        await transfers_until_phase_two_drains(local, cluster, pairs, rounds=3)
        coordinator = local.coordinator
        assert coordinator is not None
        with trio.fail_after(10):
            while undone := await coordinator.log.list(undone_only=True):
                await trio.sleep(0.01)  # the marks ride the next group commit
        records = await coordinator.log.list(limit=1000)
        commits = [r for r in records if r["outcome"] == "commit"]
        assert len(commits) >= 6 and not undone
        assert all(r["done"] and len(r["acked"]) == 2 for r in commits)


async def test_a_value_that_cannot_be_stored_fails_its_put_and_nothing_else(tmp_path: Path) -> None:
    """``tx.put`` checks the value at once (not at prepare): a method storing what CBOR
    cannot carry fails, its transaction aborts, and the shard serves on. The common
    value types skip the check (they always encode); a string is still checked (a lone
    surrogate has no UTF-8)."""
    odd = txrpc.Service("odd")

    @odd.transactional
    async def store(tx: Any, key: str, kind: str) -> None:
        value: Any = {"object": object(), "surrogate": "\ud800", "int": 2**80, "none": None}[kind]
        await tx.put(key, value)

    async with local_cluster(tmp_path, [bank, odd]) as local, txrpc.cluster(local.config) as cluster:
        for kind in ("object", "surrogate"):
            with pytest.raises(txrpc.RpcError) as failed:
                async with cluster.transaction() as t:
                    await t.odd.store("k", kind)
            assert failed.value.code == txrpc.Code.INTERNAL, failed.value
            assert "encode" in failed.value.message or "CBOR" in failed.value.message, failed.value.message
        for kind in ("int", "none"):
            async with cluster.transaction() as t:
                await t.odd.store(f"k-{kind}", kind)
        async with cluster.transaction() as t:
            assert await t.call("k-int", "bank.balance", "k-int") == 2**80
        with pytest.raises(txrpc.Aborted, match="no account k"):
            await cluster.call("k", "bank.balance", "k")  # nothing was stored under "k"


# --- transactional methods without a cancel scope per call --------------------------------


async def _only_tx(tx: Any, key: str, amount: int) -> int:
    balance = await tx.get(key, 0, for_update=True)
    if balance < amount:
        raise txrpc.Abort("insufficient funds")
    await tx.put(key, balance - amount)
    for k, _ in await tx.scan("x"):
        await tx.delete(k)
    return int(balance)


async def _sleeps(tx: Any, key: str) -> None:
    await tx.put(key, 1)
    await trio.sleep(1)


async def _rebinds(tx: Any, other: Any) -> None:
    tx = other
    await tx.get("k")


async def _awaits_another_method(tx: Any) -> None:
    await tx.commit()


async def _async_with(tx: Any, lock: trio.Lock) -> None:
    async with lock:
        await tx.get("k")


async def _nested(tx: Any) -> None:
    async def inner() -> None:
        await tx.get("k")

    await tx.get("k")


async def _awaits_a_name(tx: Any, other: Any) -> None:
    await other.get("k")


def _plain(tx: Any) -> None:
    return None


async def _async_comprehension(tx: Any, source: Any) -> list[Any]:
    await tx.get("k")
    return [x async for x in source]


async def _rebinds_in_except(tx: Any, other: Any) -> None:
    try:
        raise ValueError(other)
    except ValueError as tx:  # noqa: F841
        pass
    await tx.get("k")


async def _rebinds_in_match(tx: Any, other: Any) -> None:
    match other:
        case [tx]:
            pass
    await tx.get("k")


class _Methods:
    async def only_tx(self, tx: Any, key: str) -> Any:
        return await tx.get(key)

    async def awaits_self(self, tx: Any, key: str) -> Any:
        return await self.get(key)

    async def get(self, key: str) -> Any:
        return key


@pytest.mark.parametrize(
    ("fn", "bounded"),
    [
        (_only_tx, True),
        (_sleeps, False),
        (_rebinds, False),
        (_awaits_another_method, False),
        (_async_with, False),
        (_nested, False),
        (_awaits_a_name, False),
        (_plain, False),
        (_async_comprehension, False),
        (_rebinds_in_except, False),
        (_rebinds_in_match, False),
        (_Methods().only_tx, True),
        (_Methods().awaits_self, False),
    ],
)
def test_which_transactional_methods_wait_only_on_their_transaction(fn: Any, bounded: bool) -> None:
    """Only a method whose every await is its transaction's get/put/delete/scan runs
    without a cancel scope per call: its waits are lock waits, bounded by the deadline."""
    from coordinator._participant import awaits_only_its_transaction

    assert awaits_only_its_transaction(fn) is bounded


async def test_the_bank_runs_without_a_scope_per_call_and_a_sleeper_with_one(tmp_path: Path) -> None:
    """The shard registers the bank's methods bounded, and a method that waits on
    anything else with its scope (its deadline must be able to end it)."""
    import storage
    from coordinator import Participant

    svc = txrpc.Service("other")
    svc.transactional(_sleeps)
    async with storage.open_storage(tmp_path / "shard") as st:
        store = storage.ShardStore(st.database, st.appender, "n0")
        participant = Participant([bank, svc], store, shard="n0")
        specs = {name: spec for service in participant.services() for name, spec in service.methods.items()}
        assert all(specs[f"bank.{m}"].bounded for m in ("open_account", "balance", "withdraw", "deposit"))
        assert not specs["other._sleeps"].bounded
        assert specs["tx.prepare_many"].bounded and specs["tx.commit_one_phase"].bounded


_counter = txrpc.Service("counter")


@_counter.transactional
async def bump_then_read(tx: Any, key: str, other: str) -> list[int]:
    """Reads and bumps ``key`` (its own write), then reads ``other``."""
    value = await tx.get(key, 0)
    await tx.put(key, value + 1)
    seen = await tx.get(other, 0)
    return [int(value + 1), int(seen)]


@_counter.transactional
async def bump_swallowing(tx: Any, key: str, other: str) -> list[int]:
    """As bump_then_read, but it swallows whatever its read of ``other`` raises."""
    value = await tx.get(key, 0)
    await tx.put(key, value + 1)
    seen = -1
    try:
        seen = await tx.get(other, 0)
    except BaseException:  # (the point of the test)
        pass
    return [int(value + 1), int(seen)]


@_counter.transactional
async def read(tx: Any, key: str) -> Any:
    return await tx.get(key, None)


@_counter.transactional
async def read_twice_at_once(tx: Any, key: str) -> list[Any]:
    """Two reads of ``key`` from two tasks of one operation (both may wait for its lock)."""
    seen: list[Any] = []

    async def one() -> None:
        seen.append(await tx.get(key, 0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    return seen


async def test_two_tasks_of_one_operation_waiting_for_one_lock_both_go_on(tmp_path: Path) -> None:
    """A method may wait for one key from two tasks of its own: when the younger holder
    commits, both go on (one shared wait, _LockWait). With one wake-up per transaction and
    key, the second wait replaced the first's and the first waited until the deadline."""
    async with local_cluster(tmp_path, [_counter]) as local, txrpc.cluster(local.config) as cluster:
        key = "k"
        async with cluster.transaction() as first:  # (so that age 1 below is older than young)
            await first.call(key, "counter.read", key)
        async with trio.open_nursery() as nursery:
            async with cluster.transaction() as young:
                assert await young.call(key, "counter.bump_then_read", key, "other") == [1, 0]  # X on key
                seen: list[Any] = []

                async def older() -> None:
                    async with cluster.transaction(timeout_s=5, age=1) as old:
                        seen.extend(await old.call(key, "counter.read_twice_at_once", key))

                nursery.start_soon(older)
                participant = local.participants[local.config.shard_map.primary_of(key).name]
                with trio.fail_after(5):  # a request for the key is queued: both tasks wait
                    while not participant.core.locks.waiting():
                        await trio.sleep(0.01)
                await trio.sleep(0.1)  # (the second task starts in the same scheduler round)
                released = trio.current_time()
        assert seen == [1, 1] and trio.current_time() - released < 2


@pytest.mark.parametrize("method", ["bump_then_read", "bump_swallowing"])
async def test_an_operation_tried_at_once_that_must_wait_is_undone_and_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A transactional method that waits only on its transaction is first tried on the
    read loop, without a task; when one of its operations would wait (a lock a younger
    transaction holds), what the try did is undone and the operation runs again in a
    task, which waits: its own write is applied once, not twice -- even by a method
    that swallowed the would-wait."""
    from coordinator import Participant
    from txrpc._service import NOT_NOW

    tried: list[Any] = []
    real = Participant._try_operation_now

    def spying(self: Participant, spec: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        answer = real(self, spec, args, kwargs)
        tried.append((spec.name, answer))
        return answer

    monkeypatch.setattr(Participant, "_try_operation_now", spying)
    async with local_cluster(tmp_path, [bank, _counter]) as local, txrpc.cluster(local.config) as cluster:
        node = local.config.shard_map.nodes[0]
        key, other, third = accounts_on_one_shard(local.config, node, 3)
        async with cluster.transaction() as first:  # key = 1, other = 1 (and in the shard's cache)
            assert await first.call(key, "counter.bump_then_read", key, third) == [1, 0]
            assert await first.call(other, "counter.bump_then_read", other, third) == [1, 0]
        answers: list[Any] = []
        async with cluster.transaction() as waiter:  # begun first: the older one (it waits)

            async def waiting_op() -> None:
                answers.append(await waiter.call(key, f"counter.{method}", key, other))

            async with trio.open_nursery() as nursery:
                async with cluster.transaction() as holder:
                    assert await holder.call(other, "counter.bump_then_read", other, third) == [2, 0]  # X on other
                    tried.clear()
                    nursery.start_soon(waiting_op)  # bumps key (a buffered write), then reads other: waits
                    await trio.sleep(0.2)
                    assert tried == [(f"counter.{method}", NOT_NOW)]  # tried at once: it must wait
                    assert answers == []  # waiting, in its task
                # The holder committed: the waiter's operation goes on, from the start.
        assert answers == [[2, 2]]  # key bumped once (not from its own undone write), other read
        assert await cluster.call(key, "counter.read", key) == 2
        assert await cluster.call(other, "counter.read", other) == 2
        tried.clear()
        async with cluster.transaction() as free:
            assert await free.call(key, f"counter.{method}", key, other) == [3, 2]
        assert tried == [(f"counter.{method}", [3, 2])]  # nothing to wait for: answered at once


async def test_a_one_phase_commit_is_answered_from_its_write_without_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tx.commit_one_phase on an unreplicated shard queues its write and answers from the
    write's callback (no task); a write that fails answers "aborted" and frees the locks.
    What needs a wait or a lookup (unknown transactions, say) goes the usual way."""
    from coordinator import Participant
    from storage._shard_store import ShardStore

    answers: list[Any] = []
    real = Participant._commit_one_phase_now

    def spying(self: Participant, args: Any, kwargs: dict[str, Any]) -> Any:
        answer = real(self, args, kwargs)
        answers.append(type(answer).__name__ if isinstance(answer, txrpc.Later) else answer)
        return answer

    monkeypatch.setattr(Participant, "_commit_one_phase_now", spying)
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        node = local.config.shard_map.nodes[0]
        a, b = accounts_on_one_shard(local.config, node, 2)
        await open_accounts(cluster, [a, b], 10)
        answers.clear()
        async with cluster.transaction() as t:
            await t.bank.withdraw(a, 3)
            await t.bank.deposit(b, 3)
        assert answers == ["Later"]
        assert await total(cluster, [a, b]) == 20
        real_nowait = ShardStore.apply_commits_nowait

        def failing(self: ShardStore, commits: Any, done: Any) -> None:
            done(None, OSError("disk full (test)"))

        monkeypatch.setattr(ShardStore, "apply_commits_nowait", failing)
        with pytest.raises(txrpc.TransactionAborted, match="commit not durable"):
            async with cluster.transaction() as t:
                await t.bank.withdraw(a, 1)
        monkeypatch.setattr(ShardStore, "apply_commits_nowait", real_nowait)
        monkeypatch.setattr(ShardStore, "apply_commits_nowait", real_nowait)
        with trio.fail_after(5):  # its locks were freed
            async with cluster.transaction() as t:
                await t.bank.withdraw(a, 7)
        assert await cluster.call(a, "bank.balance", a) == 0
        shard = local.participants[node.name]
        assert shard.core.txs == {} or all(tx.state.value == "active" for tx in shard.core.txs.values())
        async with txrpc.connect(*node.address) as client:  # an unknown transaction: the usual way
            outcome = await client.call("tx.commit_one_phase", 987654)
        assert outcome["outcome"] == "aborted" and answers[-1] is txrpc.NOT_NOW
        # Last: the write's callback fails in its own bookkeeping (the transaction is then
        # stuck in memory, as it would be on the task path): the call is answered anyway.
        from coordinator._participant_core import ParticipantCore

        real_committed = ParticipantCore.committed

        def broken(self: ParticipantCore, txid: int) -> Any:
            monkeypatch.setattr(ParticipantCore, "committed", real_committed)  # once
            raise RuntimeError("bookkeeping failed (test)")

        monkeypatch.setattr(ParticipantCore, "committed", broken)
        with trio.fail_after(5), pytest.raises(txrpc.RpcError) as failed:  # answered, not left hanging
            async with cluster.transaction() as t:
                await t.bank.deposit(b, 1)
        assert "bookkeeping failed" in failed.value.message
