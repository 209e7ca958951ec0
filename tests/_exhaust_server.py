"""A server process for tests/test_exhaustion.py (run as a script): small limits, so the
resource-exhaustion cases reach them, and its memory measurable from outside.

Serves ``add(a, b)``, ``big(n)`` (n bytes back) and ``sleep(s)``. Writes its port to
``--ready-file`` (atomically) once listening.
"""

from __future__ import annotations

import argparse
import os

import trio

import txrpc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--connections-max", type=int, default=64)
    parser.add_argument("--handshake-timeout", type=float, default=0.5)
    parser.add_argument("--write-buffer", type=int, default=256 * 1024)
    parser.add_argument("--send-stall-timeout", type=float, default=2.0)
    options = parser.parse_args()
    svc = txrpc.Service()

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    @svc.method
    def big(n: int) -> bytes:
        return bytes(min(n, 1 << 20))

    @svc.method
    async def sleep(seconds: float) -> str:
        await trio.sleep(seconds)
        return "slept"

    limits = txrpc.Limits(
        connections_max=options.connections_max,
        handshake_timeout_s=options.handshake_timeout,
        write_buffer_bytes_max=options.write_buffer,
        send_stall_timeout_s=options.send_stall_timeout,
        idle_timeout_s=30.0,
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server = txrpc.Server(svc, limits=limits)
            await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            with open(options.ready_file + ".tmp", "w") as handle:
                handle.write(str(server.port))
            os.replace(options.ready_file + ".tmp", options.ready_file)

    trio.run(run)


if __name__ == "__main__":
    main()
