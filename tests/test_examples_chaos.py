"""The fault-testing guide's example runs and its invariant holds (docs/testing-under-faults.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_inventory_example_holds_its_invariant_under_faults() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "chaos" / "inventory.py"), "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seed 1: ok" in result.stdout


def test_sim_cli_runs_a_schedule_and_reports_a_broken_protocol(tmp_path: Path) -> None:
    history = tmp_path / "history.jsonl"
    ok = subprocess.run(
        [sys.executable, "-m", "txrpc.cli", "sim", "run", "--workload", "idempotency", "--seed", "3",
         "--duration", "1", "--fault", "drop:keyed-c0=0.3@0.2", "--history", str(history)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert history.read_text().count("\n") > 100
    broken = subprocess.run(
        [sys.executable, "-m", "txrpc.cli", "sim", "run", "--workload", "idempotency", "--seed", "3",
         "--duration", "2", "--fault", "drop:keyed-c0=0.3@0.2", "--fault", "drop:keyed-c1=0.3@0.2",
         "--broken", "server.skip_request_log_lookup"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "duplicate-execution" in broken.stdout
    assert "replay: txrpc sim run --workload idempotency --seed 3" in broken.stdout
