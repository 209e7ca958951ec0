"""`txrpc bench rpc`: our stack beside grpcio's grpc.aio, in one run, as ratios.

Each side runs its server and its client in two separate processes on loopback
(the same shape as the gRPC anchor in ``shared/anchors/grpc_bench``). The client
keeps N callers busy on ONE connection/channel for a fixed time and reports calls/s
and p50/p99 latency. The gRPC code is generated from a .proto at bench time.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROTO = """
syntax = "proto3";
package calculator;
service Calculator {
  rpc Add (AddRequest) returns (AddReply);
  rpc Echo (EchoMessage) returns (EchoMessage);
}
message AddRequest { int64 a = 1; int64 b = 2; }
message AddReply { int64 result = 1; }
message EchoMessage { bytes data = 1; }
"""

GRPC_SERVER = """
import asyncio, sys
import grpc
import calc_pb2, calc_pb2_grpc

class Calc(calc_pb2_grpc.CalculatorServicer):
    async def Add(self, request, context):
        return calc_pb2.AddReply(result=request.a + request.b)
    async def Echo(self, request, context):
        return calc_pb2.EchoMessage(data=request.data)

async def main(port):
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.aio.server(options=opts)
    calc_pb2_grpc.add_CalculatorServicer_to_server(Calc(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main(int(sys.argv[1])))
"""

GRPC_CLIENT = """
import asyncio, json, sys, time
import grpc
import calc_pb2, calc_pb2_grpc

async def main(port, conc, seconds, payload):
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        stub = calc_pb2_grpc.CalculatorStub(ch)
        data = b"x" * payload
        async def one():
            if payload:
                r = await stub.Echo(calc_pb2.EchoMessage(data=data))
                assert len(r.data) == payload
            else:
                r = await stub.Add(calc_pb2.AddRequest(a=1, b=2))
                assert r.result == 3
        for _ in range(20):
            await one()
        lat = []
        stop = time.perf_counter() + seconds
        async def worker():
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await one()
                lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        print(json.dumps({"calls": len(lat), "elapsed": time.perf_counter() - t0, "lat": sorted(lat)}))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])))
"""


@dataclass
class Measurement:
    stack: str
    workload: str
    callers: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    mb_per_s: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(process: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if "ready" in line:
            return
        if process.poll() is not None:
            raise RuntimeError(f"benchmark server exited with {process.returncode}")
    raise RuntimeError("benchmark server did not become ready")


def _summarise(stack: str, workload: str, callers: int, payload: int, raw: dict[str, Any]) -> Measurement:
    lat = raw["lat"]
    calls = raw["calls"]
    rate = calls / raw["elapsed"]
    p50 = lat[len(lat) // 2] * 1e3 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else float("nan")
    mb = rate * 2 * payload / 1e6
    return Measurement(stack, workload, callers, rate, p50, p99, mb)


def _run_client(argv: list[str], cwd: str | None = None) -> dict[str, Any]:
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=cwd, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- our side -------------------------------------------------------------------------------


def _txrpc_server_main(port: int) -> None:
    import trio

    import txrpc

    calc = txrpc.Service()

    @calc.method
    async def add(a: int, b: int) -> int:
        return a + b

    @calc.method
    async def echo(data: bytes) -> bytes:
        return data

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(txrpc.Server(calc).serve_tcp, "127.0.0.1", port)
            print("ready", flush=True)

    trio.run(main)


def _txrpc_client_main(port: int, callers: int, seconds: float, payload: int) -> None:
    import trio

    import txrpc

    async def main() -> None:
        async with txrpc.connect("127.0.0.1", port) as client:
            data = b"x" * payload

            async def one() -> None:
                if payload:
                    assert len(await client.echo(data)) == payload
                else:
                    assert await client.add(1, 2) == 3

            for _ in range(20):
                await one()
            lat: list[float] = []
            clock = time.perf_counter
            stop = clock() + seconds

            async def worker() -> None:
                while clock() < stop:
                    t = clock()
                    await one()
                    lat.append(clock() - t)

            t0 = clock()
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(worker)
            print(json.dumps({"calls": len(lat), "elapsed": clock() - t0, "lat": sorted(lat)}))

    trio.run(main)


def run(
    callers: list[int],
    echo_callers: list[int],
    seconds: float,
    rounds: int,
    with_grpc: bool = True,
    echo_bytes: int = 1 << 20,
    progress: Any = None,
) -> list[Measurement]:
    """Run every configuration ``rounds`` times per stack (interleaved) and keep medians."""
    python = sys.executable
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="txrpc-bench-") as work:
        stacks = ["txrpc"]
        if with_grpc:
            _prepare_grpc(work)
            stacks.append("grpc.aio")
        servers: dict[str, tuple[subprocess.Popen[str], int]] = {}
        try:
            for stack in stacks:
                port = _free_port()
                if stack == "txrpc":
                    argv = [python, "-m", "txrpc._bench_rpc", "server", str(port)]
                    cwd = None
                else:
                    argv = [python, "grpc_server.py", str(port)]
                    cwd = work
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=cwd)
                servers[stack] = (proc, port)
                _wait_ready(proc)
            plan = [("add", c, 0) for c in callers] + [("echo 1 MiB", c, echo_bytes) for c in echo_callers]
            for workload, conc, payload in plan:
                samples: dict[str, list[Measurement]] = {s: [] for s in stacks}
                for _ in range(rounds):
                    for stack in stacks:
                        _, port = servers[stack]
                        if stack == "txrpc":
                            argv = [
                                python,
                                "-m",
                                "txrpc._bench_rpc",
                                "client",
                                str(port),
                                str(conc),
                                str(seconds),
                                str(payload),
                            ]
                            raw = _run_client(argv)
                        else:
                            argv = [
                                python,
                                "grpc_client.py",
                                str(port),
                                str(conc),
                                str(seconds),
                                str(payload),
                            ]
                            raw = _run_client(argv, cwd=work)
                        samples[stack].append(_summarise(stack, workload, conc, payload, raw))
                        if progress is not None:
                            progress()
                for stack in stacks:
                    ms = samples[stack]
                    results.append(
                        Measurement(
                            stack,
                            workload,
                            conc,
                            statistics.median(m.calls_per_s for m in ms),
                            statistics.median(m.p50_ms for m in ms),
                            statistics.median(m.p99_ms for m in ms),
                            statistics.median(m.mb_per_s for m in ms),
                        )
                    )
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return results


def _prepare_grpc(work: str) -> None:
    Path(work, "calc.proto").write_text(PROTO)
    Path(work, "grpc_server.py").write_text(textwrap.dedent(GRPC_SERVER))
    Path(work, "grpc_client.py").write_text(textwrap.dedent(GRPC_CLIENT))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I.",
                "--python_out=.",
                "--grpc_python_out=.",
                "calc.proto",
            ],
            cwd=work,
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        raise RuntimeError(
            "grpcio-tools is needed for the gRPC peer: pip install -e '.[dev]' (or pass --no-grpc)"
        ) from exc


if __name__ == "__main__":
    role = sys.argv[1]
    os.environ.setdefault("PYTHONHASHSEED", "0")
    if role == "server":
        _txrpc_server_main(int(sys.argv[2]))
    elif role == "client":
        _txrpc_client_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown role {role!r}")
