"""`txrpc demo --calculator`: the calculator on loopback, called the ways users call it."""

from __future__ import annotations

import time

import trio
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ._client import connect
from ._errors import DeadlineExceeded, InvalidArgument
from ._server import Server
from ._service import Service


def _calculator() -> Service:
    calc = Service()

    @calc.method
    async def add(a: float, b: float) -> float:
        return a + b

    @calc.method
    async def div(a: float, b: float) -> float:
        if b == 0:
            raise InvalidArgument("division by zero")
        return a / b

    @calc.method
    async def slow_add(a: float, b: float, delay_s: float = 1.0) -> float:
        await trio.sleep(delay_s)
        return a + b

    return calc


def run(console: Console, calls: int) -> None:
    async def main() -> None:
        server = Server(_calculator())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            console.print(f"[bold]txrpc demo[/] — calculator serving on 127.0.0.1:{server.port}")
            async with connect("127.0.0.1", server.port) as client:
                table = Table(title="calls")
                table.add_column("call")
                table.add_column("outcome")
                table.add_row("add(1, 2)", repr(await client.add(1, 2)))
                table.add_row("div(10, 4)", repr(await client.div(10, 4)))
                try:
                    await client.div(1, 0)
                except InvalidArgument as exc:
                    table.add_row("div(1, 0)", f"InvalidArgument: {exc.message}")
                started = trio.current_time()
                try:
                    await client.options(timeout=0.2).slow_add(1, 2, delay_s=5)
                except DeadlineExceeded:
                    spent = trio.current_time() - started
                    table.add_row(
                        "slow_add(delay 5 s) with timeout 0.2 s", f"DeadlineExceeded after {spent:.2f} s"
                    )
                console.print(table)

                concurrency = 64
                done = 0
                with Progress(console=console, transient=True) as progress:
                    task = progress.add_task(f"{calls} calls, {concurrency} concurrent", total=calls)
                    t0 = time.perf_counter()

                    async def worker(count: int) -> None:
                        nonlocal done
                        for i in range(count):
                            assert await client.add(i, 1) == i + 1
                            done += 1
                            progress.advance(task)

                    async with trio.open_nursery() as workers:
                        for k in range(concurrency):
                            workers.start_soon(worker, calls // concurrency + (k < calls % concurrency))
                    elapsed = time.perf_counter() - t0
                console.print(
                    f"{done} calls on one connection in {elapsed:.2f} s: "
                    f"[bold]{done / elapsed:,.0f} calls/s[/] (client and server in this one process)"
                )
            await server.shutdown()
        console.print("[green]server shut down cleanly[/]")

    trio.run(main)
