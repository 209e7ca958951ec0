"""Hostile peers against a real trio server on loopback.

Each attack opens a raw TCP stream, sends bad bytes (after a valid hello where that
matters) and expects a goaway with the documented code, then the server closing the
connection within a bound. Throughout, a well-behaved ``txrpc.connect`` client on its
own connection keeps calling and checking every answer; afterwards the server still
accepts fresh clients and no exception escaped ``serve_tcp``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from _wire_helpers import (
    CLIENT_HELLO,
    call_with,
    call_with_raw_method,
    colliding_int_keys_map,
    msg,
    nested_arrays,
    parse_frames,
    raw_call,
    raw_frame,
    read_until_eof,
    shared_reference_bomb,
    stringref_bomb,
)

import txrpc
from txrpc import Code, Limits
from txrpc._codec import FrameDecoder, decode_value

KiB = 1024
FRAME_BYTES_MAX = 64 * KiB
LIMITS = Limits(handshake_timeout_s=0.5, frame_bytes_max=FRAME_BYTES_MAX)
GOOD_CALLS_MAX = 100_000  # bound on the well-behaved client's loop
CLOSE_WITHIN_S = 3.0  # an attacked connection ends within this
LATENCY_MAX_S = 1.0  # no answer to the good client may take longer while under attack


def make_service(sleeping: list[float]) -> txrpc.Service:
    """``sleeping`` gets the argument of every ``sleep`` call that has started."""
    service = txrpc.Service()

    @service.method
    def add(a: int, b: int) -> int:
        return a + b

    @service.method
    async def echo(value: Any) -> Any:
        return value

    @service.method
    def blob(size: int) -> bytes:
        return b"x" * size

    @service.method
    async def sleep(seconds: float) -> float:
        sleeping.append(seconds)
        await trio.sleep(seconds)
        return seconds

    return service


@dataclasses.dataclass
class Harness:
    """A server under attack plus one well-behaved client calling it in a loop."""

    server: txrpc.Server
    sleeping: list[float]
    server_running: bool = False
    good_calls: int = 0
    latency_max_s: float = 0.0
    stop: trio.Event = dataclasses.field(default_factory=trio.Event)
    good_client_done: trio.Event = dataclasses.field(default_factory=trio.Event)

    @property
    def port(self) -> int:
        return self.server.port

    async def run_server(self, task_status: trio.TaskStatus[txrpc.Server] = trio.TASK_STATUS_IGNORED) -> None:
        self.server_running = True
        try:
            await self.server.serve_tcp("127.0.0.1", 0, task_status=task_status)
        except Exception as exc:  # trio.Cancelled is a BaseException and passes
            raise AssertionError(f"an exception escaped serve_tcp: {exc!r}") from exc
        finally:
            self.server_running = False

    async def good_client(self) -> None:
        """Calls with answers it can check, until told to stop (bounded in count)."""
        try:
            async with txrpc.connect("127.0.0.1", self.port) as client:
                for i in range(GOOD_CALLS_MAX):
                    if self.stop.is_set():
                        break
                    started = trio.current_time()
                    with trio.fail_after(5):
                        if i % 2:
                            assert await client.call("add", i, 1) == i + 1
                        else:
                            value = {"i": i, "blob": bytes([i % 256]) * (i % 97), "f": [1.5, None, "é"]}
                            assert await client.call("echo", value) == value
                    self.latency_max_s = max(self.latency_max_s, trio.current_time() - started)
                    self.good_calls += 1
                    await trio.sleep(0.001)  # leave the CPU to the attackers now and then
        finally:
            self.good_client_done.set()

    async def progress(self, calls: int = 5, timeout_s: float = 5.0) -> None:
        """Wait until the good client has completed ``calls`` more calls."""
        target = self.good_calls + calls
        with trio.fail_after(timeout_s):
            while self.good_calls < target:
                assert not self.good_client_done.is_set(), "the good client stopped"
                await trio.sleep(0.005)


@asynccontextmanager
async def attacked_server(limits: Limits = LIMITS) -> AsyncIterator[Harness]:
    """Serve, run the good client, hand the harness to the test; on the way out check
    that the good client kept being served, that attack connections were all closed,
    that a fresh client works and that serve_tcp is still running."""
    sleeping: list[float] = []
    harness = Harness(txrpc.Server(make_service(sleeping), limits=limits), sleeping)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(harness.run_server)
            nursery.start_soon(harness.good_client)
            await harness.progress(calls=3)
            yield harness
            await harness.progress(calls=5)  # still served after the attack
            with trio.fail_after(CLOSE_WITHIN_S):
                while harness.server.connection_count > 1:  # only the good client is left
                    await trio.sleep(0.01)
            harness.stop.set()
            await harness.good_client_done.wait()
            assert harness.latency_max_s < LATENCY_MAX_S, f"good client waited {harness.latency_max_s:.2f} s"
            async with txrpc.connect("127.0.0.1", harness.port) as fresh:
                assert await fresh.call("add", 20, 22) == 42
            assert harness.server_running, "serve_tcp returned"
            await harness.server.shutdown(grace_s=1)


# --- attacks -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    payload: bytes
    hello_first: bool = True
    reason: str = ""  # a regex the goaway's message must match
    code: Code = Code.PROTOCOL_ERROR
    half_close: bool = False  # send EOF after the payload (the server sees a close)
    close_after_s: tuple[float, float] = (0.0, CLOSE_WITHIN_S)  # when the goaway may come


def unknown_fields_flood(size_bytes: int) -> bytes:
    """A ping with thousands of unknown fields: the error names them all."""
    fields = {"t": 5, "n": 1}
    for index in range(size_bytes // 10):  # 9 bytes a field
        fields[f"f{index:06d}"] = 0
    return msg(fields)


HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
TLS_CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64
TWO_SLEEPS_ONE_ID = msg(call_with(m="sleep", a=[30])) * 2
STALLED = {"code": Code.DEADLINE_EXCEEDED, "close_after_s": (0.4, CLOSE_WITHIN_S), "reason": "hello within"}

ATTACKS = [
    Attack("http-request", HTTP_REQUEST, hello_first=False, reason="announced"),
    Attack("tls-client-hello", TLS_CLIENT_HELLO, hello_first=False, reason="announced"),
    Attack("garbage-after-hello", random.Random(7).randbytes(300)),
    Attack("truncated-frame-then-close", msg(call_with())[:-3], reason="inside a frame", half_close=True),
    Attack("length-prefix-2-to-the-31", (2**31).to_bytes(4, "big"), reason="announced"),
    Attack("length-prefix-2-to-the-31-before-hello", (2**31).to_bytes(4, "big"), hello_first=False),
    Attack("oversized-frame-announced", (FRAME_BYTES_MAX + 1).to_bytes(4, "big"), reason="frame_bytes_max"),
    Attack("zero-length-frame", b"\x00\x00\x00\x00", reason="empty"),
    Attack("deeply-nested-args", raw_call(nested_arrays(200)), reason="depth"),
    Attack("deeply-nested-map", raw_frame(b"\xa1\x61k" * 100 + b"\x00"), reason="depth"),
    Attack("shared-reference-bomb", raw_call(b"\x81" + shared_reference_bomb(30)), reason="28/29"),
    Attack("string-reference-bomb", raw_call(b"\x81" + stringref_bomb(2048, 1000)), reason="25/256"),
    Attack("not-a-map", msg([1, 2, 3]), reason="map"),
    Attack("not-a-map-before-hello", msg("hello"), hello_first=False, reason="map"),
    Attack("unknown-kind", msg({"t": 99, "i": 1}), reason="kind"),
    Attack("unknown-field", msg(call_with(extra=1)), reason="unknown fields"),
    Attack("duplicate-field", raw_call(extra=b"\x61i\x02", extra_fields=1), reason="(?i)duplicate"),
    Attack("method-not-utf8", call_with_raw_method(b"\xc3\x28dd"), reason="text string"),
    Attack("method-overlong-utf8", call_with_raw_method(b"\xc0\xafadd"), reason="text string"),
    Attack("method-too-long", msg(call_with(m="x" * 257)), reason="'m'"),
    Attack("method-not-text", msg(call_with(m=b"add")), reason="'m'"),
    Attack("call-before-hello", msg(call_with()), hello_first=False, reason="hello first"),
    Attack("ping-before-hello", msg({"t": 5, "n": 1}), hello_first=False, reason="hello first"),
    Attack("second-hello", msg(CLIENT_HELLO), reason="second hello"),
    Attack("no-common-version", msg({"t": 0, "v": [99]}), hello_first=False, code=Code.FAILED_PRECONDITION),
    Attack(
        "hello-announcing-tiny-frames",
        msg({"t": 0, "v": [1], "l": {"frame_bytes_max": 8}}),
        hello_first=False,
        reason="frame_bytes_max",
    ),
    Attack("result-from-a-client", msg({"t": 2, "i": 1, "r": 0}), reason="client does not send"),
    Attack("call-id-zero", msg(call_with(i=0)), reason="reserved"),
    Attack("call-id-too-large", msg(call_with(i=2**63)), reason="'i'"),
    Attack("args-not-an-array", msg(call_with(a={"x": 1})), reason="'a'"),
    Attack("args-missing", msg({"t": 1, "i": 1, "m": "add"}), reason="'a'"),
    Attack("kwargs-not-a-map", msg(call_with(k=[1, 2])), reason="'k'"),
    Attack("kwargs-with-bytes-keys", msg(call_with(k={b"a": 1})), reason="'k'"),
    Attack("metadata-not-a-map", msg(call_with(md="x")), reason="'md'"),
    Attack("deadline-negative", msg(call_with(d=-1)), reason="'d'"),
    Attack("deadline-nan", msg(call_with(d=math.nan)), reason="'d'"),
    Attack("deadline-infinite", msg(call_with(d=math.inf)), reason="'d'"),
    Attack("deadline-text", msg(call_with(d="1")), reason="'d'"),
    Attack("deadline-beyond-float-range", msg(call_with(d=10**400)), reason="'d'"),
    Attack("int-keys-in-args", msg(call_with(a=[{1: "one"}])), reason="map key"),
    Attack("duplicate-call-id", TWO_SLEEPS_ONE_ID, reason="already in flight"),
    Attack("unknown-fields-flood", unknown_fields_flood(FRAME_BYTES_MAX - 2 * KiB), reason="unknown fields"),
    Attack("handshake-never-finished", msg(CLIENT_HELLO)[:5], hello_first=False, **STALLED),  # type: ignore[arg-type]
    Attack("handshake-silent", b"", hello_first=False, **STALLED),  # type: ignore[arg-type]
]


async def receive_message(stream: trio.abc.ReceiveStream, decoder: FrameDecoder) -> Any:
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(65536)
            assert chunk, "server closed the connection instead of answering"
            bodies = decoder.feed(chunk)
            if bodies:
                assert len(bodies) == 1 and decoder.buffered_bytes == 0
                return decode_value(bodies[0])


async def run_attack(port: int, attack: Attack) -> None:
    """Carry out one attack and check the server's answer: goaway with the expected code
    and reason as the last frame, then the connection closed, within the bound."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if attack.hello_first:
                await stream.send_all(msg(CLIENT_HELLO))
                hello = await receive_message(stream, FrameDecoder(1 << 20))
                assert hello["t"] == 0 and hello["v"] == [1]
            started = trio.current_time()
            if attack.payload:
                await stream.send_all(attack.payload)
            if attack.half_close:
                await stream.send_eof()
            data = await read_until_eof(stream, timeout_s=attack.close_after_s[1])
            elapsed = trio.current_time() - started
    messages, leftover = parse_frames(data)
    assert leftover == 0, f"{attack.name}: the server's last frame was cut short"
    assert messages, f"{attack.name}: the server closed without a goaway"
    goaway = messages[-1]
    assert goaway["t"] == 7, f"{attack.name}: last frame is {goaway!r}, not a goaway"
    assert goaway["c"] == attack.code, f"{attack.name}: goaway {goaway!r}"
    assert re.search(attack.reason, goaway["msg"]), f"{attack.name}: goaway {goaway!r}"
    assert all(m["t"] != 7 for m in messages[:-1])
    low, high = attack.close_after_s
    assert low <= elapsed <= high, f"{attack.name}: closed after {elapsed:.2f} s"


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
async def test_attack_is_refused_while_others_are_served(attack: Attack) -> None:
    async with attacked_server() as harness:
        before = harness.good_calls
        await run_attack(harness.port, attack)
        if attack.close_after_s[0] > 0:  # a stalled handshake blocked nobody meanwhile
            assert harness.good_calls - before >= 20


async def test_server_survives_all_attacks_at_once() -> None:
    async with attacked_server() as harness:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                for attack in ATTACKS:
                    nursery.start_soon(run_attack, harness.port, attack)
        assert harness.good_calls > 20


async def test_a_hash_flooding_frame_does_not_stall_the_server() -> None:
    """~360 KB of integer keys sharing one Python hash: building that map is quadratic
    (~10 s of a blocked event loop here, ~90 s for 1 MiB), so it must be refused before
    it is built. Were it not, the good client's latency check would fail."""
    flood = raw_frame(colliding_int_keys_map(30_000))
    assert len(flood) > 300 * KiB
    async with attacked_server(LIMITS.replace(frame_bytes_max=1 << 20)) as harness:
        await run_attack(harness.port, Attack("hash-flood", flood, reason="map key"))
        await harness.progress(calls=5, timeout_s=2)


async def test_a_peer_that_vanishes_mid_call_does_not_crash_the_server() -> None:
    async with attacked_server() as harness:
        # A small receive buffer (set before connecting, so the kernel does not grow it).
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", harness.port))
        stream = trio.SocketStream(sock)
        with trio.fail_after(10):
            await stream.send_all(msg(CLIENT_HELLO))
            await receive_message(stream, FrameDecoder(1 << 20))
            # Ask for ~7 MB of results and read none: the server's writer blocks in
            # send_all, so nothing else ends the connection before the reader sees EOF.
            await stream.send_all(b"".join(msg(call_with(i=i, m="blob", a=[60_000])) for i in range(1, 120)))
            await stream.send_all(msg(call_with(i=1000, m="sleep", a=[60])))  # no deadline
            while 60 not in harness.sleeping:
                await trio.sleep(0.01)
            await stream.send_eof()
            await trio.sleep(0.3)  # the server sees EOF and cancels the sleeping handler
            assert harness.server_running
        await trio.aclose_forcefully(stream)


async def test_unknown_method_is_unimplemented_and_the_connection_lives_on() -> None:
    async with attacked_server() as harness, txrpc.connect("127.0.0.1", harness.port) as client:
        for name in ("nope", "add.extra", "x" * 256, "é" * 10):
            with pytest.raises(txrpc.Unimplemented, match="unknown method"):
                await client.call(name, 1)
        assert await client.call("add", 1, 2) == 3
        with pytest.raises(txrpc.InvalidArgument):
            await client.call("add", 1)
        with pytest.raises(txrpc.ProtocolError) as caught:
            await client.call("x" * 257)  # refused locally: the server would end the connection
        assert caught.value.nothing_ran
        assert await client.call("add", 2, 3) == 5


async def test_wrong_type_fields_from_a_raw_client_leave_other_calls_alone() -> None:
    """A protocol error ends only the offending connection: calls in flight on other
    connections finish normally."""
    async with attacked_server() as harness, txrpc.connect("127.0.0.1", harness.port) as client:
        async with trio.open_nursery() as nursery:
            answers: list[float] = []

            async def slow_call() -> None:
                answers.append(await client.call("sleep", 0.3))

            nursery.start_soon(slow_call)
            for fields in ({"a": "x"}, {"k": 5}, {"d": -2}, {"d": math.nan}):
                await run_attack(harness.port, Attack(f"call-{fields}", msg(call_with(**fields))))
        assert answers == [0.3]
