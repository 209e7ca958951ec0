"""Open two accounts and move money between them atomically, across shards.

Run the cluster first (see README.md), then:  python examples/bank/transfer.py examples/bank/cluster.toml
"""

import sys

import trio

import txrpc


async def main(config: str) -> None:
    async with txrpc.cluster(config) as cluster:
        for name in ("alice", "bob"):
            try:
                async with cluster.transaction() as t:
                    await t.bank.open_account(name, 100)
            except txrpc.TransactionAborted as exc:
                print(f"{name}: {exc.reason}")  # already open on a second run
        shard_of = {n: cluster.config.shard_map.primary_of(n).name for n in ("alice", "bob")}
        print("accounts live on shards:", shard_of)

        async with cluster.transaction() as t:  # commits on exit, aborts on exception
            await t.bank.withdraw("alice", 10)  # routed by the first argument
            await t.bank.deposit("bob", 10)
        print(f"transaction {t.txid} {t.outcome} on shards {sorted(t.participants)}")

        try:
            async with cluster.transaction() as t:
                await t.bank.deposit("bob", 1_000_000)
                await t.bank.withdraw("alice", 1_000_000)  # raises Abort: nothing happens anywhere
        except txrpc.TransactionAborted as exc:
            print("second transfer aborted:", exc.reason)

        for name in ("alice", "bob"):
            print(name, await cluster.call(name, "bank.balance", name))


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "examples/bank/cluster.toml")
