"""CPU instructions per RPC over real loopback TCP: a noise-free A/B measure of the RPC
core's cost on real sockets (``scripts/sim_cost.py`` measures the whole stack, but over
the simulator's in-memory network, which does not run the socket paths).

Server and client run in one process, one ``trio.run``, under valgrind's cachegrind: N
calls of an ``async def`` handler that suspends once (it gets a task and a cancel scope,
as most handlers do), made by CALLERS concurrent callers over one connection. Runs with
100 and 100 + N calls, side by side, and prints the difference per call (start-up cancels
out). Needs valgrind. Repeats to about 0.1 %.

    python scripts/rpc_cost.py            # 1 and 16 callers, about 30 s on 2 cores
    python scripts/rpc_cost.py 4          # 4 callers
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

BASE_CALLS = 100
CALLS = 3000


def worker(calls: int, callers: int) -> None:
    import trio

    import txrpc

    calc = txrpc.Service()

    @calc.method
    async def add(a: int, b: int) -> int:
        await trio.lowlevel.checkpoint()
        return a + b

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(txrpc.Server(calc).serve_tcp, "127.0.0.1", 0)
            async with txrpc.connect("127.0.0.1", server.port) as client:
                left = [calls]

                async def caller() -> None:
                    while left[0] > 0:
                        left[0] -= 1
                        assert await client.add(1, 2) == 3

                async with trio.open_nursery() as callers_nursery:
                    for _ in range(callers):
                        callers_nursery.start_soon(caller)
            nursery.cancel_scope.cancel()

    trio.run(main)


def measure(calls: int, callers: int) -> int:
    """Instructions of one run under cachegrind."""
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, __file__, "--worker", str(calls), str(callers),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    refs = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    assert refs, out.stderr[-2000:]
    return int(refs.group(1).replace(",", ""))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt install valgrind)")
    for callers in [int(sys.argv[1])] if len(sys.argv) > 1 else [1, 16]:
        with ThreadPoolExecutor(2) as pool:
            base, more = pool.map(measure, [BASE_CALLS, BASE_CALLS + CALLS], [callers, callers])
        print(f"{(more - base) / CALLS / 1e3:.1f} k instructions per call ({callers} callers, {CALLS} calls)")


if __name__ == "__main__":
    main()
