"""Your own service under the deterministic simulator, with your own invariant.

An inventory service keeps stock per item on the item's shard; an order reserves one
unit of two items atomically (two shards, one transaction). The invariant: for every
item, ``stock + sold == INITIAL`` and ``stock >= 0`` — checked against a consistent
read after the faults stop. Each seed replays exactly:

    python examples/chaos/inventory.py            # 5 seeds, crashes + message faults
    python examples/chaos/inventory.py --seed 3   # one seed
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

import trio

import txrpc
from txrpc.testing import Fault, SimOptions, Simulation, apply_fault, simulate

ITEMS = [f"item{i}" for i in range(6)]
INITIAL = 20

inventory = txrpc.Service("inventory")


@inventory.transactional
async def stock(tx: Any, item: str) -> dict[str, int]:
    value = await tx.get(item)
    if value is None:
        raise txrpc.Abort(f"no item {item}")
    return dict(value)


@inventory.transactional
async def add_item(tx: Any, item: str, units: int) -> None:
    await tx.put(item, {"stock": units, "sold": 0})


@inventory.transactional
async def sell(tx: Any, item: str) -> None:
    value = await tx.get(item, for_update=True)
    if value is None or value["stock"] <= 0:
        raise txrpc.Abort(f"{item} is sold out")
    await tx.put(item, {"stock": value["stock"] - 1, "sold": value["sold"] + 1})


FAULTS = (
    Fault(0.4, "crash", "s1"),
    Fault(0.8, "restart", "s1"),
    Fault(0.5, "drop", "coordinator", "s0", 0.05),
    Fault(1.0, "crash", "coordinator"),
    Fault(1.3, "restart", "coordinator"),
    Fault(1.5, "partition", "c1", "s2"),
)


async def scenario(sim: Simulation) -> list[str]:
    """Clients place orders while the faults play; returns the invariant's violations."""
    async with sim.client("setup") as cluster:
        for item in ITEMS:
            async with cluster.transaction() as t:
                await t.inventory.add_item(item, INITIAL)
    start = trio.current_time()

    async def nemesis() -> None:
        for fault in FAULTS:
            await trio.sleep_until(start + fault.at_s)
            await apply_fault(sim, fault)

    async def shopper(index: int) -> None:
        rng = random.Random(index)
        async with sim.client(f"c{index}") as cluster:
            while trio.current_time() < start + 2.0:
                first, second = rng.sample(ITEMS, 2)
                try:
                    async with cluster.transaction(timeout_s=1.0) as t:
                        await t.inventory.sell(first)
                        await t.inventory.sell(second)
                except (txrpc.TransactionAborted, txrpc.OutcomeUnknown, txrpc.RpcError):
                    pass  # whatever happened must still satisfy the invariant
                await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(nemesis)
        for index in range(3):
            nursery.start_soon(shopper, index)
    sim.heal()
    await sim.restart_all()
    await sim.wait_settled(30.0)

    async with sim.client("auditor") as cluster:
        async with cluster.transaction(timeout_s=5.0) as t:
            states = {item: await t.inventory.stock(item) for item in ITEMS}
    return [
        f"{item}: stock {s['stock']} + sold {s['sold']} != {INITIAL}"
        for item, s in states.items()
        if s["stock"] + s["sold"] != INITIAL or s["stock"] < 0
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, help="run one seed (default: seeds 0..4)")
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else range(5)
    failed = 0
    for seed in seeds:
        violations = simulate(scenario, seed=seed, services=[inventory], options=SimOptions())
        print(f"seed {seed}: {'ok' if not violations else 'VIOLATED: ' + '; '.join(violations)}")
        failed += bool(violations)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
