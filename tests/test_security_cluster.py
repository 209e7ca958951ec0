"""A cluster with [security]: mutual TLS everywhere, the participant's and coordinator's
internal methods refused to ordinary clients, and the transactions they target unharmed.
In-process coordinator and shards, real TCP (TLS) on loopback, real SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from _cluster_helpers import ROOT, LocalCluster, cluster_toml
from test_replication import assert_replicas_equal
from test_tx import accounts_on_distinct_shards, bank

import txrpc
from coordinator import TxState
from txrpc import _certs
from txrpc._shardmap import ClusterConfig

SECURITY_TOML = """
[security]
ca_file = "{certs}/ca.pem"
certs_dir = "{certs}"
client_cert = "require"
token_secret_file = "{certs}/token.secret"
"""


def secure_config(tmp_path: Path, nodes: int = 2, replication_factor: int = 1) -> ClusterConfig:
    certs = tmp_path / "certs"
    names = ["coordinator", *(f"n{i}" for i in range(nodes)), "client", "admin", "mallory"]
    _certs.make_dev_certs(certs, names)
    toml = cluster_toml(tmp_path / "data", nodes, replication_factor=replication_factor)
    text = toml + SECURITY_TOML.format(certs=certs)
    (tmp_path / "cluster.toml").write_text(text)
    return ClusterConfig.from_toml(text, source="secure-cluster.toml")


@asynccontextmanager
async def secure_cluster(tmp_path: Path, nodes: int = 2, replication_factor: int = 1) -> AsyncIterator[LocalCluster]:
    config = secure_config(tmp_path, nodes, replication_factor)
    async with trio.open_nursery() as nursery:
        local = LocalCluster(config, nursery, [bank])
        await local.start_coordinator()
        for node in config.shard_map.nodes:
            await local.start_shard(node.name)
        try:
            yield local
        finally:
            await local.stop()


def as_(config: ClusterConfig, name: str) -> txrpc.Credentials:
    assert config.security is not None
    return config.security.credentials_for(name)


async def test_cluster_runs_over_mutual_tls_and_refuses_strangers(tmp_path: Path) -> None:
    async with secure_cluster(tmp_path) as local:
        config = local.config
        names = accounts_on_distinct_shards(config, 2)
        with txrpc.use_credentials(as_(config, "client")):
            async with txrpc.cluster(config) as cluster:
                for name in names:
                    async with cluster.transaction() as t:
                        await t.bank.open_account(name, 100)
                async with cluster.transaction() as t:  # two shards: two-phase commit
                    await t.bank.withdraw(names[0], 30)
                    await t.bank.deposit(names[1], 30)
                async with cluster.transaction() as t:
                    assert [await t.bank.balance(n) for n in names] == [70, 130]
        # No certificate: refused by every process of the cluster.
        assert config.coordinator is not None
        addresses = [(config.coordinator.host, config.coordinator.port)]
        addresses += [node.address for node in config.shard_map.nodes]
        assert config.security is not None
        anonymous = txrpc.Credentials(tls=txrpc.TLSConfig(ca_file=config.security.ca_file))
        for host, port in addresses:
            with pytest.raises(txrpc.Unauthenticated):
                async with txrpc.connect(host, port, credentials=anonymous) as client:
                    await client.call("tx.status")
        # Plain TCP: no conversation at all.
        for host, port in addresses:
            with pytest.raises(txrpc.RpcError):
                async with txrpc.connect(host, port, limits=txrpc.Limits(retries_max=0)) as client:
                    await client.call("tx.status")


async def test_client_cannot_drive_a_participant_and_the_transaction_is_unaffected(tmp_path: Path) -> None:
    async with secure_cluster(tmp_path) as local:
        config = local.config
        a, b = accounts_on_distinct_shards(config, 2)
        shard_a = config.shard_map.primary_of(a)
        with txrpc.use_credentials(as_(config, "client")):
            async with txrpc.cluster(config) as cluster:
                for name in (a, b):
                    async with cluster.transaction() as t:
                        await t.bank.open_account(name, 100)

                async with cluster.transaction() as t:
                    await t.bank.withdraw(a, 40)
                    await t.bank.deposit(b, 40)
                    txid = t.txid
                    # Mallory (a valid certificate, no peer role) goes straight to shard a.
                    async with txrpc.connect(*shard_a.address, credentials=as_(config, "mallory")) as mallory:
                        for method, arg in (
                            ("tx.prepare", txid),
                            ("tx.prepare_many", [txid]),
                            ("tx.commit", txid),
                            ("tx.commit_many", [txid]),
                        ):
                            with pytest.raises(txrpc.PermissionDenied, match="peer"):
                                await mallory.call(method, arg)
                        for method in ("tx.abort", "tx.commit_one_phase"):
                            with pytest.raises(txrpc.PermissionDenied, match="another caller"):
                                await mallory.call(method, txid)
                        # Nor can she slip an operation into the transaction.
                        meta = {"txid": txid, "op_seq": 2, "epoch": config.shard_map.epoch}
                        with pytest.raises(txrpc.PermissionDenied, match="another caller"):
                            await mallory.options(metadata=meta).call("bank.deposit", a, 1_000_000)
                        # Reading its state is allowed (clients ask it for one-phase outcomes).
                        assert (await mallory.call("tx.status", txid))["state"] == "active"
                    # The owner itself cannot send the coordinator's messages either.
                    async with txrpc.connect(*shard_a.address) as owner:
                        with pytest.raises(txrpc.PermissionDenied):
                            await owner.call("tx.prepare", txid)
                        with pytest.raises(txrpc.PermissionDenied):
                            await owner.call("tx.commit", txid)
                    assert local.participants[shard_a.name].core.txs[txid].state is TxState.ACTIVE
                # ... and the transaction committed exactly as its owner wrote it.
                async with cluster.transaction() as t:
                    assert await t.bank.balance(a) == 60
                    assert await t.bank.balance(b) == 140


async def test_prepared_transaction_is_the_coordinators_to_decide(tmp_path: Path) -> None:
    async with secure_cluster(tmp_path) as local:
        config = local.config
        (a,) = accounts_on_distinct_shards(config, 1)
        shard_a = config.shard_map.primary_of(a)
        participant = local.participants[shard_a.name]
        with txrpc.use_credentials(as_(config, "client")):
            async with txrpc.cluster(config) as cluster, txrpc.connect(*shard_a.address) as owner:
                async with cluster.transaction() as t:
                    await t.bank.open_account(a, 100)
                tx = cluster.transaction()
                await tx.__aenter__()
                await tx.bank.withdraw(a, 10)
                # The coordinator prepares it (in-process here, as if phase 1 had run)...
                assert (await participant.prepare(tx.txid))["vote"] == "yes"
                # ... and then not even its owner may abort or commit it at the shard.
                with pytest.raises(txrpc.PermissionDenied, match="prepared"):
                    await owner.call("tx.abort", tx.txid)
                with pytest.raises(txrpc.PermissionDenied, match="prepared"):
                    await owner.call("tx.commit_one_phase", tx.txid)
                assert participant.core.in_doubt() == [tx.txid]
                await participant.abort(tx.txid)  # the coordinator's decision, in-process
                with pytest.raises(txrpc.TransactionAborted):
                    await tx.__aexit__(None, None, None)


async def test_admin_methods_at_the_coordinator(tmp_path: Path) -> None:
    async with secure_cluster(tmp_path) as local:
        config = local.config
        assert config.coordinator is not None
        address = (config.coordinator.host, config.coordinator.port)
        async with txrpc.connect(*address, credentials=as_(config, "client")) as client:
            for method, args in (("coord.resolve", (123, "commit")), ("coord.transactions", (False, 10))):
                with pytest.raises(txrpc.PermissionDenied):
                    await client.call(method, *args)
            assert (await client.call("coord.lease", 1))["count"] == 1  # ordinary methods work
        async with txrpc.connect(*address, credentials=as_(config, "admin")) as admin:
            assert await admin.call("coord.transactions", False, 10) == []
        # `txrpc tx ls` presents the admin's certificate from the cluster file.
        from click.testing import CliRunner

        from txrpc.cli import cli

        args = ["tx", "ls", "--config", str(tmp_path / "cluster.toml")]
        result = await trio.to_thread.run_sync(CliRunner().invoke, cli, args)
        assert result.exit_code == 0, result.output
        # This cluster requires certificates: a token alone does not get in.
        assert config.security is not None
        token_only = txrpc.Credentials(tls=txrpc.TLSConfig(ca_file=config.security.ca_file), token="x")
        with pytest.raises(txrpc.Unauthenticated):
            async with txrpc.connect(*address, credentials=token_only) as client:
                await client.call("coord.lease", 1)


async def test_another_client_cannot_commit_abort_or_ask_about_a_transaction(tmp_path: Path) -> None:
    """Transactions are their owner's at the coordinator too: txids are small integers,
    easy to guess, so another identity naming one is refused, and the transaction (or a
    leased id not yet used) is unaffected."""
    async with secure_cluster(tmp_path) as local:
        config = local.config
        assert config.coordinator is not None
        coordinator = (config.coordinator.host, config.coordinator.port)
        a, b = accounts_on_distinct_shards(config, 2)
        participants = sorted({config.shard_map.primary_of(n).name for n in (a, b)})
        with txrpc.use_credentials(as_(config, "client")):
            async with txrpc.cluster(config) as cluster:
                for name in (a, b):
                    async with cluster.transaction() as t:
                        await t.bank.open_account(name, 100)
                async with (
                    txrpc.connect(*coordinator, credentials=as_(config, "mallory")) as mallory,
                    txrpc.connect(*coordinator, credentials=as_(config, "admin")) as admin,
                ):
                    async with cluster.transaction() as t:
                        await t.bank.withdraw(a, 25)
                        txid = t.txid
                        unused = cluster._leased[-1]  # leased by the client, not begun yet
                        for target in (txid, unused):
                            with pytest.raises(txrpc.PermissionDenied, match="another caller"):
                                await mallory.call("coord.commit", target, participants)
                            with pytest.raises(txrpc.PermissionDenied, match="another caller"):
                                await mallory.call("coord.abort", target, participants)
                            with pytest.raises(txrpc.PermissionDenied, match="another caller"):
                                await mallory.call("coord.decision", target)
                        await t.bank.deposit(b, 25)
                    assert await mallory.call("coord.lease", 1)  # her own ids work as usual
                    assert await admin.call("coord.decision", txid) == "commit"  # peers and admins may ask
                    async with cluster.transaction() as t:  # the unused id is still good
                        assert t.txid == unused
                        assert [await t.bank.balance(n) for n in (a, b)] == [75, 125]


async def test_a_lease_flood_evicts_only_the_flooders_leases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator remembers a bounded number of leases per identity: a client
    flooding it with leases forgets its own, not another's; an id whose lease was
    forgotten can no longer be touched by anyone but a peer or admin (nothing changes on
    an ordinary client's word) and its owner's commit is refused retryably."""
    import coordinator._coordinator_core as core_module

    monkeypatch.setattr(core_module, "LEASES_PER_OWNER_MAX", 4)
    async with secure_cluster(tmp_path) as local:
        config = local.config
        assert config.coordinator is not None
        coordinator = (config.coordinator.host, config.coordinator.port)
        async with (
            txrpc.connect(*coordinator, credentials=as_(config, "client")) as alice,
            txrpc.connect(*coordinator, credentials=as_(config, "mallory")) as mallory,
        ):
            forgotten = (await alice.call("coord.lease", 1))["first"]
            kept = (await alice.call("coord.lease", 2))["first"]
            for _ in range(20):
                await mallory.call("coord.lease", 1)
            for txid in (forgotten, kept):  # mallory's flood pushed out only her own leases
                with pytest.raises(txrpc.PermissionDenied, match="another caller"):
                    await mallory.call("coord.abort", txid, ["n0"])
            for _ in range(3):  # alice's own hoard pushes her oldest lease out
                await alice.call("coord.lease", 1)
            assert await mallory.call("coord.abort", forgotten, ["n0"]) == "ok"  # changes nothing
            assert await mallory.call("coord.decision", forgotten) == "abort"
            with pytest.raises(txrpc.Aborted, match="unknown") as refused:
                await alice.call("coord.commit", forgotten, [])
            assert refused.value.details.get("retryable") and refused.value.details.get("unknown_txid")
            assert (await alice.call("coord.commit", kept, []))["outcome"] == "committed"


async def test_after_a_coordinator_restart_only_the_owner_can_redrive_a_one_phase_commit(tmp_path: Path) -> None:
    """A restarted coordinator no longer knows who owns an earlier transaction; a commit
    of a single-shard one is driven again at the shard, which does know: another
    identity is refused there, and the transaction stays as its owner left it."""
    async with secure_cluster(tmp_path) as local:
        config = local.config
        assert config.coordinator is not None
        coordinator = (config.coordinator.host, config.coordinator.port)
        (a,) = accounts_on_distinct_shards(config, 1)
        shard = config.shard_map.primary_of(a)
        with txrpc.use_credentials(as_(config, "client")):
            async with txrpc.cluster(config) as cluster:
                async with cluster.transaction() as t:
                    await t.bank.open_account(a, 100)
                txid = (await cluster.coordinator.call("coord.begin", None))["txid"]
                meta = {"txid": txid, "op_seq": 1, "epoch": config.shard_map.epoch}
                async with txrpc.connect(*shard.address) as raw:
                    assert await raw.options(metadata=meta).call("bank.deposit", a, 5) == 105
                local.crash("coordinator")
                await trio.sleep(0.1)
                await local.start_coordinator()
                assert local.coordinator is not None and txid < local.coordinator.core.first_txid
                async with txrpc.connect(*coordinator, credentials=as_(config, "mallory")) as mallory:
                    with pytest.raises(txrpc.PermissionDenied, match="another caller"):
                        await mallory.call("coord.commit", txid, [shard.name])
                assert local.participants[shard.name].core.txs[txid].state is TxState.ACTIVE
                again = await cluster.coordinator.call("coord.commit", txid, [shard.name])
                assert again["outcome"] == "committed"
                async with cluster.transaction() as t:
                    assert await t.bank.balance(a) == 105


async def test_replication_and_ring_methods_are_for_peers_and_admins(tmp_path: Path) -> None:
    """With replication: a client cannot send a follower the primary's messages, nor
    change the shard map; the data and the map stay as they were."""
    async with secure_cluster(tmp_path, nodes=2, replication_factor=2) as local:
        config = local.config
        assert config.coordinator is not None
        coordinator = (config.coordinator.host, config.coordinator.port)
        a, b = accounts_on_distinct_shards(config, 2)
        with txrpc.use_credentials(as_(config, "client")):
            async with txrpc.cluster(config) as cluster:
                for name in (a, b):
                    async with cluster.transaction() as t:
                        await t.bank.open_account(name, 100)
                epoch = cluster.router.shard_map.epoch
                mallory_creds = as_(config, "mallory")
                for node in config.shard_map.nodes:
                    async with txrpc.connect(*node.address, credentials=mallory_creds) as mallory:
                        for method, args in (
                            ("repl.prepare", (10**6, [[a, 1, b"x"]])),
                            ("repl.prepare_many", ([[10**6, [[a, False, b"x"]]]],)),
                            ("repl.commit", (10**6,)),
                            ("repl.commit_many", ([10**6],)),
                            ("repl.abort", (10**6,)),
                            ("repl.install_map", ({},)),
                            ("repl.snapshot", ([0], 0, 100)),
                            ("repl.catch_up", ("n0", [0])),
                            ("repl.drop_partitions", ([0, 1, 2],)),
                        ):
                            with pytest.raises(txrpc.PermissionDenied, match="peer"):
                                await mallory.call(method, *args)
                async with txrpc.connect(*coordinator, credentials=mallory_creds) as mallory:
                    for method, args in (
                        ("coord.mark_down", ("n0",)),
                        ("coord.promote", ("n1",)),
                        ("coord.rejoin", ("n0",)),
                        ("coord.add_node", ("n9", "127.0.0.1", 1)),
                        ("coord.remove_node", ("n1",)),
                    ):
                        with pytest.raises(txrpc.PermissionDenied, match="admin"):
                            await mallory.call(method, *args)
                    assert (await mallory.call("coord.shard_map"))["epoch"] == epoch  # reading it is open
                async with cluster.transaction() as t:
                    await t.bank.withdraw(a, 10)
                    await t.bank.deposit(b, 10)
                assert (await cluster.coordinator.call("coord.shard_map"))["epoch"] == epoch
                await assert_replicas_equal(local)
                async with cluster.transaction() as t:
                    assert [await t.bank.balance(n) for n in (a, b)] == [90, 110]


def test_security_table_is_checked(tmp_path: Path) -> None:
    base = cluster_toml(tmp_path, 2)
    with pytest.raises(txrpc.ConfigError, match=r"security\.ca_file"):
        ClusterConfig.from_toml(base + '[security]\ncerts_dir = "c"\n')
    with pytest.raises(txrpc.ConfigError, match="token_secret_file"):
        ClusterConfig.from_toml(base + '[security]\nca_file = "a"\ncerts_dir = "c"\nclient_cert = "none"\n')
    with pytest.raises(txrpc.ConfigError, match="client_cert"):
        ClusterConfig.from_toml(base + '[security]\nca_file = "a"\ncerts_dir = "c"\nclient_cert = "maybe"\n')
    with pytest.raises(txrpc.ConfigError, match=r"unknown|tls_everywhere"):
        ClusterConfig.from_toml(base + '[security]\nca_file = "a"\ncerts_dir = "c"\ntls_everywhere = true\n')
    config = ClusterConfig.from_toml(
        base + '[security]\nca_file = "a"\ncerts_dir = "c"\nadmins = ["ops"]\n', base_dir=tmp_path
    )
    assert config.security is not None
    assert config.security.ca_file == tmp_path / "a"
    assert config.security.peers == ("coordinator", "n0", "n1")
    assert config.security.roles()["ops"] == {"admin"}
    assert ROOT.exists()
