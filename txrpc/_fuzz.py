"""Fuzz targets: the frame decoder (in-process) and a live server connection (real TCP).

Both take one input as ``bytes`` and raise only on a bug, so the same targets run under
atheris (``make fuzz``: ``python -m txrpc._fuzz decoder|live``) and under pytest with
Hypothesis and a seeded generator (``tests/test_fuzz.py``, a small count by default).

* :func:`decoder_target` feeds the input to the sans-IO :class:`~txrpc._connection.Connection`
  (server and client roles) in chunks the input chooses, raw or behind a valid hello,
  or as the body of one well-framed message. Anything but ``RemoteProtocolError`` (the
  typed refusal) is a crash.
* :class:`LiveServer` runs ``python -m txrpc._fuzz serve`` (a server with a request log
  on SQLite, bearer tokens and anonymous callers) in a child process;
  :meth:`LiveServer.one_input` opens a TCP connection, sends what the input describes —
  raw bytes, framed CBOR bodies, valid hellos and calls with mutated fields —, half-closes
  and reads until the server closes. A crash is: the server process dies, the server
  logs an exception from a connection (``connection from … failed``) or a handler error
  it did not mean (``INTERNAL``), a connection not closed within ``CLOSE_TIMEOUT_S`` of
  our EOF, or a health call that fails. The server's peak RSS (``VmHWM``) is reported.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _connection as wire
from ._codec import encode_value, frame
from ._limits import Limits

FUZZ_LIMITS = Limits(
    frame_bytes_max=64 * 1024,
    calls_inflight_max=64,
    handshake_timeout_s=2.0,
    idle_timeout_s=5.0,
    write_buffer_bytes_max=256 * 1024,
    call_timeout_max_s=1.0,
)
"""Small limits, so the fuzzer reaches them (a real server's are larger)."""
CLOSE_TIMEOUT_S = 5.0
SEED_CORPUS_INPUTS = 200
SECRET = bytes(range(32))


# --- the decoder --------------------------------------------------------------------------


def _hello() -> bytes:
    return wire.Connection(wire.Role.CLIENT).send_hello(agent="fuzz")


def decoder_target(data: bytes) -> None:
    """One input for the decoder; raises only on a bug."""
    if len(data) < 2:
        return
    mode, chunking = data[0] % 4, data[1]
    payload = data[2:]
    if mode == 0:  # raw bytes to a server that has seen nothing
        stream, role = payload, wire.Role.SERVER
    elif mode == 1:  # raw bytes after a valid hello: the call/cancel/ping paths
        stream, role = _hello() + payload, wire.Role.SERVER
    elif mode == 2:  # one well-framed body after a valid hello: the CBOR and shape checks
        stream, role = _hello() + frame(payload) if payload else _hello(), wire.Role.SERVER
    else:  # a client receiving the bytes after its hello
        stream, role = payload, wire.Role.CLIENT
    limits = Limits(frame_bytes_max=4096, cbor_depth_max=16, calls_inflight_max=8)
    conn = wire.Connection(role, limits)
    if role is wire.Role.CLIENT:
        conn.send_hello()
    step = 1 + chunking % 64 if chunking < 192 else len(stream) or 1
    try:
        for start in range(0, len(stream), step):
            for event in conn.receive_data(stream[start : start + step]):
                _answer(conn, event)
        for event in conn.receive_data(b""):
            _answer(conn, event)
    except wire.RemoteProtocolError as exc:
        assert isinstance(exc.message, str) and exc.code, exc
        # A goaway naming the problem must always be sendable.
        conn.send_goaway(exc.code, exc.message)


def _answer(conn: wire.Connection, event: wire.Event) -> None:
    """Do what a server does with each event, so the sending paths run too."""
    if conn.role is wire.Role.SERVER:
        if isinstance(event, wire.Hello) and not conn.is_open:
            conn.send_hello()
        elif isinstance(event, wire.Call):
            try:
                conn.send_result(event.id, event.args)
            except TypeError:
                conn.send_error(event.id, 13, "unencodable")
            except wire.LocalProtocolError:
                conn.send_error(event.id, 8, "too large")
        elif isinstance(event, wire.CallRefused):
            conn.send_error(event.id, event.code, event.message)
        elif isinstance(event, wire.Ping):
            conn.send_pong(event.nonce)


# --- the live server ------------------------------------------------------------------------


def _serve_main(port_file: str, db_dir: str) -> None:
    """The child process: a server with small limits, tokens, anonymous callers, a request log."""
    import logging

    import trio

    import storage
    import txrpc

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    svc = txrpc.Service()

    @svc.method
    async def echo(value: Any) -> Any:
        return value

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    @svc.method
    async def sleep(seconds: float) -> str:
        await trio.sleep(min(float(seconds), 0.5))
        return "slept"

    @svc.method
    async def fail(message: str) -> None:
        raise txrpc.InvalidArgument(str(message))

    @svc.method(idempotent=True)
    async def keyed(value: Any) -> Any:
        txrpc.current_call().store  # noqa: B018 -- touch the store transaction
        return value

    @svc.method(allow=txrpc.ROLE_ADMIN)
    async def admin() -> str:
        return "admin"

    security = txrpc.ServerSecurity(token_verifier=txrpc.HmacTokenVerifier(SECRET), allow_anonymous=True)

    async def main() -> None:
        async with storage.open_storage(db_dir) as st, trio.open_nursery() as nursery:
            server = txrpc.Server(svc, limits=FUZZ_LIMITS, request_log=st, security=security)
            await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            Path(port_file + ".tmp").write_text(str(server.port))
            os.replace(port_file + ".tmp", port_file)

    trio.run(main)


METHODS = ("echo", "add", "sleep", "fail", "keyed", "admin", "nope", "")


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 4 else 7)
    if kind == 0:
        return rng.randrange(-(2**70), 2**70)
    if kind == 1:
        return rng.choice([0, 1, -1, 2**63 - 1, 2**64, -(2**64), 2**31])
    if kind == 2:
        return rng.random() * rng.choice([1, 1e300, -1e-300])
    if kind == 3:
        return rng.choice([float("nan"), float("inf"), -float("inf"), -0.0])
    if kind == 4:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 5:
        return rng.randbytes(rng.randrange(16))
    if kind == 6:
        return rng.choice([None, True, False])
    if kind in (7, 8):
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == 9:
        return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randrange(5))}
    if kind == 10:
        return {"t": rng.randrange(9), "i": rng.randrange(5)}
    return "x" * rng.choice([255, 256, 4000, 70000])


def _random_key(rng: random.Random) -> str:
    return rng.choice(["t", "i", "m", "a", "k", "d", "md", "v", "l", "auth", "x", "", "idempotency_key"])


def _random_message(rng: random.Random, call_id: int) -> dict[str, Any]:
    """A message of a random kind whose fields are usually right and sometimes not."""
    kind = rng.choice([1, 1, 1, 1, 4, 5, 5, 7, 0, 2, 3, 6, 9])
    message: dict[str, Any] = {"t": kind}
    if kind == 1:
        method = rng.choice(METHODS)
        args: list[Any] = []
        if method == "echo":
            args = [_random_value(rng)]
        elif method == "add":
            args = [rng.randrange(100), rng.randrange(100)]
        elif method == "sleep":
            args = [rng.random() / 20]
        elif method == "fail":
            args = ["boom"]
        elif method == "keyed":
            args = [rng.randrange(3)]
        message.update({"i": call_id, "m": method, "a": args})
        if rng.random() < 0.3:
            message["d"] = rng.choice([0, 0.001, 0.5, 10, 1e300, -1, float("nan")])
        if rng.random() < 0.4:
            md: dict[str, Any] = {}
            if rng.random() < 0.7:
                md["idempotency_key"] = rng.choice(["k1", "k2", "", "x" * 300, 5, "\x00"])
            if rng.random() < 0.3:
                md["idempotency_wait"] = rng.choice([True, False, 1])
            message["md"] = md
    elif kind == 4:
        message["i"] = rng.choice([call_id, call_id - 1, 0, 2**64])
    elif kind in (5, 6):
        message["n"] = rng.choice([1, 0, -1, 2**63, "x"])
    elif kind == 7:
        message.update({"last": rng.randrange(10), "c": 0, "msg": "bye"})
    elif kind == 0:
        message.update({"v": [1], "l": {}})
    for _ in range(rng.choice([0, 0, 0, 0, 1, 2])):  # a field wrong, missing or extra
        field = _random_key(rng)
        if rng.random() < 0.5:
            message.pop(field, None)
        else:
            message[field] = _random_value(rng)
    return message


def _hello_bytes(rng: random.Random) -> bytes:
    choice = rng.randrange(10)
    if choice < 5:
        return _hello()
    hello: dict[str, Any] = {"t": 0, "v": [1], "l": {"frame_bytes_max": 65536}}
    if choice == 5:
        hello["auth"] = {"bearer": rng.choice(["", "txrpc1.a.b", "x" * 5000, 5])}
    elif choice == 6:
        from ._security import mint_token

        hello["auth"] = {"bearer": mint_token(SECRET, "fuzzer", roles=rng.choice([[], ["admin"]]))}
    elif choice == 7:
        hello["auth"] = _random_value(rng)
    elif choice == 8:
        hello["v"] = rng.choice([[], [2], [1, 2, 3], ["1"], [1] * 20])
    else:
        hello["l"] = {"frame_bytes_max": rng.choice([1, 1023, 2**40]), "calls_inflight_max": 0}
    return frame(encode_value(hello))


def live_input_from_seed(seed: int) -> bytes:
    """The bytes one live-fuzz input sends, generated from ``seed`` (reproducible)."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    mode = rng.randrange(10)
    if mode == 0:  # raw garbage
        return rng.randbytes(rng.randrange(1, 200))
    parts.append(_hello_bytes(rng))
    for index in range(rng.randrange(1, 12)):
        message = _random_message(rng, index + 1)
        try:
            body = encode_value(message)
        except (TypeError, ValueError):
            body = rng.randbytes(8)
        roll = rng.random()
        if roll < 0.05 and body:
            flipped = bytearray(body)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            body = bytes(flipped)
        if roll > 0.97:  # a lying length prefix
            parts.append(struct.pack(">I", rng.choice([0, len(body) + 5, 2**31, 70000])) + body)
        else:
            parts.append(frame(body))
    if mode == 1:  # cut anywhere
        joined = b"".join(parts)
        return joined[: rng.randrange(len(joined) + 1)]
    return b"".join(parts)



def _receive_or_fail(sock: socket.socket) -> bytes:
    """One read for the health check; EOF fails it (a closed connection's empty reads
    must never become a busy loop)."""
    data = sock.recv(65536)
    if not data:
        raise AssertionError("fuzz server closed the health-check connection")
    return data

class LiveServer:
    """A fuzz server in a child process; :meth:`one_input` is the live target."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="txrpc-fuzz-")
        self.log_path = Path(self._dir.name) / "server.log"
        port_file = Path(self._dir.name) / "port"
        self._log = open(self.log_path, "wb")  # closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "txrpc._fuzz", "serve", str(port_file), str(Path(self._dir.name) / "db")],
            stdout=self._log,
            stderr=self._log,
        )
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fuzz server did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.inputs = 0
        self.hangs = 0

    def one_input(self, data: bytes) -> None:
        """Send ``data`` on a fresh connection, half-close, read until the server closes."""
        self.inputs += 1
        with socket.create_connection(("127.0.0.1", self.port), timeout=CLOSE_TIMEOUT_S) as sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + CLOSE_TIMEOUT_S
                while sock.recv(65536):
                    if time.monotonic() > deadline:
                        raise TimeoutError
            except (ConnectionResetError, BrokenPipeError):
                pass  # the server closed on a protocol error while we were still sending
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:  # reset before our half-close: closed too
                    raise
            except TimeoutError:
                self.hangs += 1
                raise AssertionError(f"server did not close within {CLOSE_TIMEOUT_S} s of EOF: {data!r:.200}") from None
        if self.inputs % 1000 == 0:
            self.check()

    def check(self) -> None:
        """Raise if the server died, logged a connection failure, or fails a real call."""
        if self.process.poll() is not None:
            raise AssertionError(f"fuzz server exited with {self.process.returncode}: {self.log_text()[-3000:]}")
        log = self.log_text()
        for marker in ("failed\n", "Traceback", "INTERNAL", "raised (call"):
            if marker in log:
                raise AssertionError(f"fuzz server logged an error:\n{log[-3000:]}")
        conn = wire.Connection(wire.Role.CLIENT)
        call = frame(encode_value({"t": 1, "i": 1, "m": "add", "a": [2, 3]}))
        with socket.create_connection(("127.0.0.1", self.port), timeout=CLOSE_TIMEOUT_S) as sock:
            sock.sendall(conn.send_hello())
            while not conn.is_open:  # a call may follow only the server's hello
                conn.receive_data(_receive_or_fail(sock))
            sock.sendall(call)
            events: list[Any] = []
            while not any(isinstance(e, (wire.Result, wire.Error, wire.ConnectionClosed)) for e in events):
                events += conn.receive_data(_receive_or_fail(sock))
        results = [e for e in events if isinstance(e, wire.Result)]
        assert results and results[0].value == 5, f"health call failed: {events}"

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def peak_rss_bytes(self) -> int:
        """The server process's peak resident set (``VmHWM``)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self._dir.cleanup()


# --- drivers --------------------------------------------------------------------------------


def run_live(inputs: int, seed: int) -> dict[str, Any]:
    """``inputs`` live inputs from seeds ``seed, seed+1, …``; returns the figures."""
    server = LiveServer()
    started = time.monotonic()
    try:
        for index in range(inputs):
            server.one_input(live_input_from_seed(seed + index))
            if (index + 1) % 10_000 == 0:  # checked every 1,000 inputs: these counts are crash-free
                rss_mib = server.peak_rss_bytes() / 2**20
                print(f"live: {index + 1} inputs, 0 crashes, server peak RSS {rss_mib:.1f} MiB", flush=True)
        server.check()
        return {
            "target": "live",
            "inputs": server.inputs,
            "crashes": 0,
            "seconds": round(time.monotonic() - started, 1),
            "server_peak_rss_mib": round(server.peak_rss_bytes() / 2**20, 1),
        }
    finally:
        server.close()


def run_decoder_atheris(runs: int, argv: list[str]) -> None:
    """The decoder under atheris (coverage-guided libFuzzer) for ``runs`` inputs. libFuzzer
    prints the count (``Done N runs``), the peak RSS (``stat::peak_rss_mb``) and exits; a
    crash stops it with the input saved as ``crash-*``."""
    import atheris

    corpus = Path(tempfile.mkdtemp(prefix="txrpc-fuzz-corpus-"))
    for seed in range(SEED_CORPUS_INPUTS):  # start from real conversations, in each mode
        sample = live_input_from_seed(seed)
        (corpus / f"seed-{seed}").write_bytes(bytes([seed % 4, seed % 256]) + sample[len(_hello()) * (seed % 2) :])
    atheris.instrument_all()  # txrpc's modules are loaded already: instrument them in place
    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", "-print_final_stats=1", "-max_len=8192", *argv, str(corpus)], decoder_target
    )
    atheris.Fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m txrpc._fuzz")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("port_file")
    serve.add_argument("db_dir")
    for name in ("decoder", "live"):
        target = sub.add_parser(name)
        target.add_argument("--runs", type=int, default=100_000)
        target.add_argument("--seed", type=int, default=1)
    options, rest = parser.parse_known_args()
    if options.command == "serve":
        _serve_main(options.port_file, options.db_dir)
    elif options.command == "decoder":
        run_decoder_atheris(options.runs, rest)
    else:
        print(run_live(options.runs, options.seed), flush=True)


if __name__ == "__main__":
    main()
