"""The seed's blocking API, in-process and as the example scripts run it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import txrpc
from txrpc.sync import Client, Server

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_seed_example_in_process() -> None:
    server = Server(port=0)
    server.add = lambda a, b: a + b
    server.start(background=True)
    try:
        client = Client("localhost", server.port)
        assert client.add(1, 2) == 3
        assert client.add("a", "b") == "ab"
        with pytest.raises(txrpc.Unimplemented):
            client.sub(1, 2)
        with pytest.raises(txrpc.InvalidArgument):
            client.add(1)
        client.close()
    finally:
        server.stop()


def test_blocking_client_is_thread_safe() -> None:
    server = Server(port=0)

    @server.method
    def square(x: int) -> int:
        return x * x

    server.start(background=True)
    results: dict[int, int] = {}
    try:
        with Client("127.0.0.1", server.port) as client:

            def worker(base: int) -> None:
                for i in range(base, base + 50):
                    results[i] = client.square(i)

            threads = [threading.Thread(target=worker, args=(k * 50,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
    finally:
        server.stop()
    assert results == {i: i * i for i in range(400)}


def test_blocking_client_timeout() -> None:
    server = Server(port=0)
    server.pause = lambda: time.sleep(0)  # a plain function; the slow one is async below
    server.start(background=True)
    try:
        with Client("127.0.0.1", server.port, timeout=5) as client:
            assert client.pause() is None
    finally:
        server.stop()


def test_seed_example_scripts_run_as_written(tmp_path: Path) -> None:
    """examples/calculator/server_blocking.py and client_blocking.py on port 12345."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 12345))
    except OSError:
        pytest.skip("port 12345, which the seed's example hard-codes, is in use")
    finally:
        probe.close()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "examples/calculator/server_blocking.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", 12345), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("the blocking example server did not start") from None
                time.sleep(0.05)
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples/calculator/client_blocking.py")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "3"
    finally:
        server.terminate()
        server.wait(timeout=10)
