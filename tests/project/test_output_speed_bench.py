"""bench/output_speed.py still runs (its numbers live in BENCHMARKS.md, not in tests)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("parallel") is None, reason="GNU parallel is not installed")
def test_the_output_speed_bench_prints_both_scenarios_for_every_runner() -> None:
    """A small run (2,000 lines, one round) prints a table with site-pipeline, GNU parallel
    and /dev/null alone, and site-pipeline and GNU parallel two among six."""
    done = subprocess.run(
        [sys.executable, "bench/output_speed.py", "--lines", "2000", "--rounds", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ")[:2] for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        ["| alone", "site-pipeline"],
        ["| alone", "GNU parallel"],
        ["| alone", "/dev/null (no runner)"],
        ["| two among six", "site-pipeline"],
        ["| two among six", "GNU parallel"],
    ]
