"""The benchmark script still runs (its numbers live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT


@pytest.mark.slow
def test_bench_script_measures_a_small_workload(tmp_path: Path) -> None:
    """bench/cap.py with the asyncio runner prints a table whose overlap respects the cap."""
    report = tmp_path / "report.md"
    result = subprocess.run(
        [
            PYTHON,
            "bench/cap.py",
            "--runners",
            "asyncio",
            "--n",
            "6",
            "--c",
            "2",
            "--t",
            "0.2",
            "--scale",
            "0",
            "--write",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    row = next(
        line for line in report.read_text().splitlines() if line.startswith("| plain asyncio")
    )
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4] == "2"  # max overlap equals the cap
    assert 0 < float(cells[3]) <= 1.0  # efficiency
