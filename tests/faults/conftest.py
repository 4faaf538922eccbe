"""The fault-injection suite: real CLI subprocesses on tiny presets, with faults injected for real.

Run alone with ``pytest -m faults``. Every test records what it injected through the ``fault_report`` fixture; the
session ends with one table: faults injected, runs that completed afterwards, files lost (must be 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_ROWS: list["FaultRow"] = []


@dataclass
class FaultRow:
    test: str
    fault: str
    survived: bool = False
    files_lost: int = 0
    detail: str = ""


@dataclass
class FaultReport:
    test: str
    rows: list = field(default_factory=list)

    def injected(self, fault: str) -> FaultRow:
        """Record a fault about to be injected; set ``.survived``/``.files_lost`` once the outcome is checked."""
        row = FaultRow(self.test, fault)
        self.rows.append(row)
        _ROWS.append(row)
        return row


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def fault_report(request) -> FaultReport:
    return FaultReport(request.node.nodeid)


def run_rae(args, *, env_extra=None, cwd=None, timeout=600, check=False) -> subprocess.CompletedProcess:
    """Run ``python -m rae_cli ARGS`` in a subprocess (the real CLI); ``env_extra`` adds e.g. RAE_FAULT_INJECT."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "COLUMNS": "400"}  # wide: rich does not wrap the one-line errors the tests read
    env.pop("RAE_FAULT_INJECT", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "rae_cli", *map(str, args)], env=env, cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"rae {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def rae_cli_run():
    """``rae_cli_run(args, env_extra=...)``: the real CLI in a subprocess (session scope: module fixtures use it)."""
    return run_rae


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("fault-injection summary")
    w = max(len(r.fault) for r in _ROWS)
    for r in _ROWS:
        tr.write_line(f"{r.fault:<{w}}  {'survived' if r.survived else 'NOT SURVIVED'}  files lost {r.files_lost}"
                      + (f"  ({r.detail})" if r.detail else ""))
    survived = sum(r.survived for r in _ROWS)
    lost = sum(r.files_lost for r in _ROWS)
    tr.write_line(f"faults: {len(_ROWS)} injected, {survived} survived, {lost} files lost")

