"""Async client for the calculator: run `txrpc serve examples/calculator/service.py:calc --port 12345` first."""

import sys

import trio

import txrpc


async def main(port: int) -> None:
    async with txrpc.connect("127.0.0.1", port) as client:
        print("add(1, 2) =", await client.add(1, 2))
        # Many calls share one connection.
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(client.add, i, i)
        try:
            await client.div(1, 0)
        except txrpc.InvalidArgument as exc:
            print("div(1, 0) ->", exc)
        # The deadline travels with the call: the server stops slow_add after 0.2 s.
        try:
            await client.options(timeout=0.2).slow_add(1, 2, delay_s=5)
        except txrpc.DeadlineExceeded as exc:
            print("slow_add with 0.2 s ->", exc)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 12345)
