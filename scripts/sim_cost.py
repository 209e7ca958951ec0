"""Instructions per committed cross-shard transfer in the simulator: a noise-free A/B
measure of the production stack's CPU cost (these machines' wall-clock speed drifts by
1.5x within an hour; instruction counts repeat to 0.01 %).

Runs ``txrpc bench sim``'s workload (16 clients, 600 accounts: few conflicts) under
valgrind's cachegrind twice, with 10 and with N transfers, side by side, and prints the
difference per committed transfer (start-up and setup cancel out). Needs valgrind.

    python scripts/sim_cost.py            # about 40 s on 2 cores
    git stash; python scripts/sim_cost.py; git stash pop   # the same before a change
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ACCOUNTS = 600
CLIENTS = 16


def worker(transfers: int) -> None:
    import txrpc.testing._workloads as workloads

    original = workloads.WorkloadOptions

    def options(**kwargs: object) -> object:
        kwargs["accounts"] = ACCOUNTS
        return original(**kwargs)  # type: ignore[arg-type]

    workloads.WorkloadOptions = options  # type: ignore[assignment, misc]
    from txrpc._sim_cli import measure_sim

    print("committed", measure_sim(0, transfers, CLIENTS, 0.0005).done)


def measure(transfers: int) -> tuple[int, int]:
    """(committed, instructions) of one run under cachegrind."""
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, __file__, "--worker", str(transfers),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # one hash seed: the run repeats exactly
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    committed = int(re.search(r"committed (\d+)", out.stdout).group(1))  # type: ignore[union-attr]
    refs = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    assert refs, out.stderr[-2000:]
    return committed, int(refs.group(1).replace(",", ""))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt install valgrind)")
    transfers = int(sys.argv[1]) if len(sys.argv) > 1 else 310
    with ThreadPoolExecutor(2) as pool:
        (c0, i0), (c1, i1) = pool.map(measure, [10, transfers])
    print(f"{(i1 - i0) / (c1 - c0) / 1e6:.3f} M instructions per committed cross-shard transfer "
          f"({c1 - c0} transfers, {CLIENTS} clients, {ACCOUNTS} accounts)")  # fmt: skip


if __name__ == "__main__":
    main()
