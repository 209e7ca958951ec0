"""One-phase commit after a coordinator restart (finding 1 of specs/tla/README.md).

A single-shard transaction commits in one phase and leaves no coordinator record, so a
restarted coordinator must not presume it aborted: a retried ``commit(txid, [p])`` is
driven again as one-phase commit at ``p``, and ``Cluster.outcome`` asks the shard.
In-process coordinator + 3 shards on loopback TCP, each on its own SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from _cluster_helpers import LocalCluster, local_cluster
from test_tx import accounts_on_distinct_shards, bank, open_accounts

import txrpc
from coordinator._coordinator_core import CoordinatorCore, Decision, Phase


async def restart_coordinator(local: LocalCluster) -> None:
    """Crash the coordinator (memory gone, storage kept) and start it again."""
    local.crash("coordinator")
    await trio.sleep(0.1)
    await local.start_coordinator()


async def raw_op(local: LocalCluster, key: str, txid: int, op_seq: int, method: str, *args: object) -> object:
    """One transactional operation sent straight to ``key``'s shard."""
    node = local.config.shard_map.primary_of(key)
    meta = {"txid": txid, "op_seq": op_seq, "epoch": local.config.shard_map.epoch}
    async with txrpc.connect(*node.address) as raw:
        return await raw.options(metadata=meta, retries_max=0).call(method, *args)


async def test_one_phase_commit_is_reported_committed_after_a_coordinator_restart(tmp_path: Path) -> None:
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        node = local.config.shard_map.primary_of(alice).name
        await open_accounts(cluster, [alice], 10)
        async with cluster.transaction() as t:  # one shard: tx.commit_one_phase, straight to it
            await t.bank.deposit(alice, 5)
        assert t.outcome == "committed" and t.participants == {node}
        assert local.coordinator is not None and await local.coordinator.log.get(t.txid) is None

        await restart_coordinator(local)
        assert local.coordinator is not None and t.txid < local.coordinator.core.first_txid
        # The outcome query (before anything else reminds the coordinator of the txid)...
        assert await cluster.outcome(t.txid) == "committed"  # participants unknown: the shards are asked
        assert await cluster.outcome(t.txid, [node]) == "committed"
        # ... and the client's retried commit (e.g. its first answer was lost).
        again = await cluster.coordinator.call("coord.commit", t.txid, [node])
        assert again["outcome"] == "committed"
        assert await cluster.outcome(t.txid) == "committed"
        assert await cluster.call(alice, "bank.balance", alice) == 15  # committed exactly once


async def test_one_phase_commit_through_the_coordinator_survives_its_restart(tmp_path: Path) -> None:
    """``coord.commit(txid, [p])`` runs the one-phase commit itself; its memory of the
    outcome dies with it, the shard's commit log does not."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        node = local.config.shard_map.primary_of(alice).name
        await open_accounts(cluster, [alice], 10)
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
        assert await raw_op(local, alice, txid, 1, "bank.deposit", alice, 5) == 15
        assert (await cluster.coordinator.call("coord.commit", txid, [node]))["outcome"] == "committed"

        await restart_coordinator(local)
        assert (await cluster.coordinator.call("coord.commit", txid, [node]))["outcome"] == "committed"
        assert await cluster.outcome(txid, [node]) == "committed"
        assert await cluster.call(alice, "bank.balance", alice) == 15


async def test_an_active_one_phase_transaction_commits_exactly_once_when_redriven(tmp_path: Path) -> None:
    """The coordinator crashed before its one-phase commit reached the shard: the
    transaction is still ACTIVE there (holding its lock). The retried commit commits it,
    once; it is not answered "aborted" while the shard could still commit it."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        node = local.config.shard_map.primary_of(alice).name
        await open_accounts(cluster, [alice], 10)
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
        assert await raw_op(local, alice, txid, 1, "bank.deposit", alice, 5) == 15
        assert await cluster.outcome(txid, [node]) == "pending"  # still ACTIVE at the shard

        await restart_coordinator(local)
        for _ in range(2):
            assert (await cluster.coordinator.call("coord.commit", txid, [node]))["outcome"] == "committed"
        assert await cluster.outcome(txid, [node]) == "committed"
        with trio.fail_after(5):  # its lock is free
            assert await cluster.call(alice, "bank.balance", alice) == 15


@pytest.mark.parametrize("asked_by", ["commit", "outcome", "outcome_of_unknown_participants"])
async def test_a_one_phase_transaction_that_never_committed_is_aborted_for_good(
    tmp_path: Path, asked_by: str
) -> None:
    """The shard never saw the transaction when, after the coordinator's restart, the
    client asks again (a retried commit, or the outcome query): it is aborted, and stays
    aborted -- a late (delayed or duplicated) first operation and one-phase commit are
    refused, so no lock is left behind and nothing commits after the answer "aborted"."""
    async with (
        local_cluster(tmp_path, [bank], shard={"tx_idle_timeout_s": 60.0}) as local,
        txrpc.cluster(local.config) as cluster,
    ):
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        node = local.config.shard_map.primary_of(alice).name
        await open_accounts(cluster, [alice], 10)
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]

        await restart_coordinator(local)
        if asked_by == "commit":
            with pytest.raises(txrpc.Aborted):
                await cluster.coordinator.call("coord.commit", txid, [node])
        elif asked_by == "outcome":
            assert await cluster.outcome(txid, [node]) == "aborted"
        else:
            assert await cluster.outcome(txid) == "aborted"

        # The operation's request arrives late: refused, it takes no lock.
        with pytest.raises(txrpc.Aborted):
            await raw_op(local, alice, txid, 1, "bank.deposit", alice, 5)
        async with txrpc.connect(*local.config.shard_map.primary_of(alice).address) as raw:
            late = await raw.call("tx.commit_one_phase", txid)
        assert late["outcome"] == "aborted"
        with trio.fail_after(5):  # alice is not locked: another transaction writes it at once
            async with cluster.transaction() as t:
                await t.bank.withdraw(alice, 1)
        assert await cluster.call(alice, "bank.balance", alice) == 9
        assert await cluster.outcome(txid, [node]) == "aborted"
        assert await cluster.outcome(txid) == "aborted"
        with pytest.raises(txrpc.Aborted):
            await cluster.coordinator.call("coord.commit", txid, [node])


async def test_a_one_phase_transaction_the_shard_aborted_is_reported_aborted(tmp_path: Path) -> None:
    """The shard aborted it (here: told to, as after a client's abort); the restarted
    coordinator answers the retried commit from the shard: aborted, locks free."""
    async with local_cluster(tmp_path, [bank]) as local, txrpc.cluster(local.config) as cluster:
        (alice,) = accounts_on_distinct_shards(local.config, 1)
        node = local.config.shard_map.primary_of(alice).name
        await open_accounts(cluster, [alice], 10)
        txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
        assert await raw_op(local, alice, txid, 1, "bank.deposit", alice, 5) == 15
        async with txrpc.connect(*local.config.shard_map.primary_of(alice).address) as raw:
            assert await raw.call("tx.abort", txid) == "ok"

        await restart_coordinator(local)
        with pytest.raises(txrpc.Aborted, match="aborted"):
            await cluster.coordinator.call("coord.commit", txid, [node])
        assert await cluster.outcome(txid, [node]) == "aborted"
        assert await cluster.outcome(txid) == "aborted"
        with trio.fail_after(5):
            async with cluster.transaction() as t:
                await t.bank.withdraw(alice, 1)
        assert await cluster.call(alice, "bank.balance", alice) == 9


def test_core_redrives_only_a_single_participant_txid_of_an_earlier_incarnation() -> None:
    """The sans-IO side: which unknown txids are driven again as one-phase commit."""
    core = CoordinatorCore(txid_block_size=10)
    core.recover(durable_block_end=11, commit_records=[])  # an earlier incarnation had 1..10
    assert core.start_commit(5, ("n0",), 0.0) == ("unknown", None)
    assert core.redrive_one_phase(5, ("n0", "n1"), 0.0) == ("unknown", None)  # two-phase: presumed abort
    assert core.redrive_one_phase(11, ("n0",), 0.0) == ("unknown", None)  # never handed out
    kind, tx = core.redrive_one_phase(5, ("n0",), 0.0)
    assert kind == "one_phase" and tx is not None and tx.phase is Phase.PREPARING
    assert core.redrive_one_phase(5, ("n0",), 0.0) == ("wait", tx)  # a concurrent retry waits for it
    core.one_phase_unanswered(tx)  # no answer: nothing decided here, a retry asks again
    assert core.get(5) is None
    kind, again = core.redrive_one_phase(5, ("n0",), 0.0)
    assert kind == "one_phase" and again is not None
    core.one_phase_result(again, True)
    assert core.start_commit(5, ("n0",), 0.0) == ("done", again) and again.decision is Decision.COMMIT


def test_core_an_unanswered_one_phase_commit_of_this_incarnation_is_asked_again() -> None:
    core = CoordinatorCore(txid_block_size=10)
    core.block_written(core.needs_block() or 0)
    tx = core.begin(0.0)
    assert core.start_commit(tx.txid, ("n0",), 1.0) == ("one_phase", tx)
    core.one_phase_unanswered(tx)
    kind, again = core.start_commit(tx.txid, ("n0",), 2.0)  # not "wait" for an attempt that is over
    assert kind == "one_phase" and again is not None and again.decision is None


def test_core_remembers_who_leased_or_began_each_txid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ownership for the coordinator's checks, kept per identity and bounded: one
    identity hoarding leases forgets only its own oldest (their unused ids become
    unknown), never another's; a lease is let go once every id has begun."""
    import coordinator._coordinator_core as core_module

    monkeypatch.setattr(core_module, "LEASES_PER_OWNER_MAX", 2)
    core = CoordinatorCore(txid_block_size=1000)
    core.block_written(core.needs_block_for(100) or 0)
    first, count = core.lease(3, owner="alice")
    began = core.begin(0.0, owner="bob")
    assert [core.owner_of(first + i) for i in range(count)] == ["alice"] * 3
    assert core.owner_of(began.txid) == "bob" and core.owner_of(began.txid + 1) == ""
    kind, tx = core.start_commit(first + 1, ("n0", "n1"), 0.0)
    assert kind == "prepare" and tx is not None and tx.owner == "alice"
    for _ in range(50):  # mallory hoards: only her own leases are forgotten
        core.lease(2, owner="mallory")
    assert core.owner_of(first) == "alice" and core.owner_of(first + 2) == "alice"
    flood_first = core.lease(2, owner="mallory")[0]
    assert core.owner_of(flood_first - 100) == ""  # her early ones are gone
    assert core.start_commit(flood_first - 100, ("n0",), 0.0) == ("unknown", None)
    core.lease(1, owner="alice")
    core.lease(1, owner="alice")  # alice's third lease: her first is forgotten
    assert core.owner_of(first) == "" and core.start_commit(first, ("n0",), 0.0) == ("unknown", None)
    kind, tx = core.start_commit(began.txid, ("n0",), 0.0)
    assert kind == "one_phase" and tx is not None and tx.owner == "bob"
    core.one_phase_unanswered(tx)  # forgotten attempt: the retry adopts it for bob again
    assert core.owner_of(began.txid) == "bob"
    kind, again = core.start_commit(began.txid, ("n0",), 1.0)
    assert kind == "one_phase" and again is not None and again.owner == "bob"


def test_core_without_owners_adopts_any_id_it_handed_out() -> None:
    """A coordinator that does not authenticate (no owners) adopts any id of this
    incarnation it has no state for, as before ownership existed."""
    core = CoordinatorCore(txid_block_size=1000)
    core.block_written(core.needs_block_for(10) or 0)
    first, _ = core.lease(10)
    assert not core.owners_tracked and not core._leases
    kind, tx = core.start_commit(first + 9, ("n0", "n1"), 0.0)
    assert kind == "prepare" and tx is not None and tx.owner == ""


def test_core_forgotten_one_phase_attempts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unanswered one-phase attempts are remembered (for their owner's retry) up to
    UNANSWERED_REMEMBERED_MAX; beyond it the oldest is forgotten, and its id is then
    unknown: a retry is refused retryably instead of adopted for anyone."""
    import coordinator._coordinator_core as core_module

    monkeypatch.setattr(core_module, "UNANSWERED_REMEMBERED_MAX", 3)
    core = CoordinatorCore(txid_block_size=1000)
    core.block_written(core.needs_block_for(10) or 0)
    txs = [core.begin(0.0, owner=f"client{i}") for i in range(5)]
    for tx in txs:
        assert core.start_commit(tx.txid, ("n0",), 0.0) == ("one_phase", tx)
        core.one_phase_unanswered(tx)
    assert len(core._unanswered) == 3
    assert [core.owner_of(tx.txid) for tx in txs] == ["", "", "client2", "client3", "client4"]
    assert core.start_commit(txs[0].txid, ("n0",), 1.0) == ("unknown", None)
    kind, again = core.start_commit(txs[4].txid, ("n0",), 1.0)
    assert kind == "one_phase" and again is not None and again.owner == "client4"
