"""Instructions per committed cross-shard transfer in the simulator: a noise-free A/B
measure of the production stack's CPU cost (these machines' wall-clock speed drifts by
1.5x within an hour; instruction counts repeat to 0.01 %).

Runs ``txrpc bench sim``'s workload (16 clients unless ``--clients``, 600 accounts: few
conflicts) under valgrind's cachegrind twice, with 10 (or as many as there are clients)
and with N transfers, side by side, and prints the difference per committed transfer
(start-up and setup cancel out). Needs valgrind.

    python scripts/sim_cost.py            # about 40 s on 2 cores
    git stash; python scripts/sim_cost.py; git stash pop   # the same before a change
    python scripts/sim_cost.py --single   # single-shard (one-phase) transfers instead
    python scripts/sim_cost.py --seeds 4  # the mean over seeds 0..3 (about 2 min)
    python scripts/sim_cost.py --replication 3   # replicated shards (R = 3)
    python scripts/sim_cost.py --clients 48      # more clients: bigger batches, as real loads

One seed repeats exactly for the same code, but any change to the code (even one that
does no work in the simulation) can move its figure by up to ~1.5 %: objects land at other
addresses, and the order of sets hashed by address changes the simulated schedule. Compare
versions with ``--seeds 4`` (the seeds move the same way for a real change).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ACCOUNTS = 600
CLIENTS = 16


def worker(transfers: int, same_shard: bool, seed: int, replication: int = 1, clients: int = CLIENTS) -> None:
    import txrpc.testing._workloads as workloads

    original = workloads.WorkloadOptions

    def options(**kwargs: object) -> object:
        kwargs["accounts"] = ACCOUNTS
        return original(**kwargs)  # type: ignore[arg-type]

    workloads.WorkloadOptions = options  # type: ignore[assignment, misc]
    from txrpc._sim_cli import measure_sim

    kinds: dict[str, object] = {"same_shard": True} if same_shard else {}  # (older versions: cross-shard only)
    if replication != 1:
        kinds["replication_factor"] = replication
    print("committed", measure_sim(seed, transfers, clients, 0.0005, **kinds).done)


def measure(
    transfers: int, same_shard: bool = False, seed: int = 0, replication: int = 1, clients: int = CLIENTS
) -> tuple[int, int]:
    """(committed, instructions) of one run under cachegrind."""
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, __file__, "--worker", str(transfers), "single" if same_shard else "cross", str(seed),
        str(replication), str(clients),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # one hash seed: the run repeats exactly
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    committed = int(re.search(r"committed (\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    refs = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    assert refs, out.stderr[-2000:]
    return committed, int(refs.group(1).replace(",", ""))


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3] == "single", int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt install valgrind)")
    parser = argparse.ArgumentParser(description="CPU instructions per committed transfer in the simulator.")
    parser.add_argument("transfers", nargs="?", type=int, default=310, help="transfers of the long run")
    parser.add_argument("--single", action="store_true", help="single-shard (one-phase) transfers")
    parser.add_argument("--seeds", type=int, default=1, help="the mean over seeds 0..N-1")
    parser.add_argument("--replication", type=int, default=1, help="replication factor (copies of each partition)")
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help="concurrent clients (more: bigger batches, as under a real load)"
    )
    args = parser.parse_args()
    if args.clients < 1 or args.transfers <= max(10, args.clients):
        parser.error(f"needs at least 1 client and more transfers than max(10, clients) ({max(10, args.clients)})")
    jobs = [
        (n, args.single, seed, args.replication, args.clients)
        for seed in range(args.seeds)
        for n in (max(10, args.clients), args.transfers)
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda job: measure(*job), jobs))
    pairs = list(zip(results[0::2], results[1::2], strict=True))
    per_seed = [(i1 - i0) / (c1 - c0) for (c0, i0), (c1, i1) in pairs]
    committed = sum(c1 - c0 for (c0, _), (c1, _) in pairs)
    kind = "single-shard (one-phase)" if args.single else "cross-shard"
    if args.replication != 1:
        kind += f" at R = {args.replication}"
    spread = f" (seeds: {', '.join(f'{v / 1e6:.3f}' for v in per_seed)})" if args.seeds > 1 else ""
    print(f"{sum(per_seed) / len(per_seed) / 1e6:.3f} M instructions per committed {kind} transfer "
          f"({committed} transfers, {args.clients} clients, {ACCOUNTS} accounts){spread}")  # fmt: skip

if __name__ == "__main__":
    main()
