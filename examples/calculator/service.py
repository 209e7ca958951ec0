"""The seed's calculator as a txrpc service (async handlers).

Serve it:   txrpc serve examples/calculator/service.py:calc --port 12345
Call it:    txrpc call 127.0.0.1:12345 add 1 2
"""

import trio

import txrpc

calc = txrpc.Service()


@calc.method
async def add(a: float, b: float) -> float:
    return a + b


@calc.method
async def div(a: float, b: float) -> float:
    if b == 0:
        raise txrpc.InvalidArgument("division by zero")
    return a / b


@calc.method
async def slow_add(a: float, b: float, delay_s: float = 1.0) -> float:
    """Adds after a delay; shows deadlines: the server stops when the caller's time is up."""
    await trio.sleep(delay_s)
    return a + b


@calc.method
async def echo(data: bytes) -> bytes:
    return data
