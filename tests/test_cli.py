"""The `txrpc` command line: serve, call, demo, --version, --help."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import txrpc
from txrpc.cli import cli

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def txrpc_serve(service_spec: str) -> Iterator[int]:
    """``txrpc serve SERVICE_SPEC`` in a process of its own; yields its port once it listens."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "txrpc.cli", "serve", service_spec, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(
                        f"txrpc serve did not start: {proc.stderr.read() if proc.stderr else ''}"
                    ) from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def calculator_port() -> Iterator[int]:
    with txrpc_serve("examples/calculator/service.py:calc") as port:
        yield port


def test_version_and_help() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and txrpc.__version__ in result.output
    for args in (
        ["--help"],
        ["serve", "--help"],
        ["call", "--help"],
        ["demo", "--help"],
        ["bench", "rpc", "--help"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, (args, result.output)
        assert "Usage" in result.output


def test_serve_and_call(calculator_port: int) -> None:
    runner = CliRunner()
    address = f"127.0.0.1:{calculator_port}"
    result = runner.invoke(cli, ["call", address, "add", "1", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == 3
    result = runner.invoke(cli, ["call", address, "add", "[1]", "[2, 3]"])
    assert json.loads(result.output) == [1, 2, 3]
    result = runner.invoke(cli, ["call", address, "add", "ab", "cd"])  # not JSON: strings
    assert json.loads(result.output) == "abcd"


def test_call_errors_exit_nonzero_with_the_code(calculator_port: int) -> None:
    runner = CliRunner()
    address = f"127.0.0.1:{calculator_port}"
    result = runner.invoke(cli, ["call", address, "div", "1", "0"])
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT" in result.output and "division by zero" in result.output
    result = runner.invoke(cli, ["call", address, "nope"])
    assert result.exit_code == 1 and "UNIMPLEMENTED" in result.output
    result = runner.invoke(cli, ["call", address, "slow_add", "1", "2", "5", "--timeout", "0.2"])
    assert result.exit_code == 1 and "DEADLINE_EXCEEDED" in result.output


def test_serve_freezes_its_start_up_heap(tmp_path: Path) -> None:
    """`txrpc serve` moves what start-up allocated out of the collector's view (a full
    collection would walk it with the event loop stopped): seen from a handler."""
    module = tmp_path / "gc_service.py"
    module.write_text(
        "import gc\nimport txrpc\nsvc = txrpc.Service()\n\n"
        "@svc.method\ndef frozen() -> int:\n    return gc.get_freeze_count()\n"
    )
    with txrpc_serve(f"{module}:svc") as port:
        result = CliRunner().invoke(cli, ["call", f"127.0.0.1:{port}", "frozen"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) > 1000  # modules, services, SQLAlchemy: thousands of objects


def test_call_bad_address_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["call", "nohostport", "add"])
    assert result.exit_code == 2 and "HOST:PORT" in result.output


def test_serve_bad_spec_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["serve", "examples/calculator/service.py:nothing"])
    assert result.exit_code == 2 and "no attribute" in result.output
    result = CliRunner().invoke(cli, ["serve", "json:dumps"])
    assert result.exit_code == 2 and "not a txrpc.Service" in result.output


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "mutual-tls"])
def test_bank_demo_runs_a_cluster_and_conserves_money(tls: bool) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "txrpc.cli",
            "demo",
            "--transfers",
            "150",
            "--concurrency",
            "8",
            "--accounts",
            "40",
            *(["--tls"] if tls else []),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "150/150" in out.stdout
    assert "total conserved, no negative balance" in out.stdout
    assert "40,000 / 40,000" in out.stdout
    assert "replicas agree" in out.stdout
    assert ("mutual TLS" in out.stdout) == tls
    assert "cluster stopped" in out.stdout


def test_calculator_demo_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "txrpc.cli", "demo", "--calculator", "--calls", "500"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "InvalidArgument: division by zero" in out.stdout
    assert "DeadlineExceeded" in out.stdout
    assert "500 calls" in out.stdout
    assert "shut down cleanly" in out.stdout
