"""The Windows lane's wiring (issue 45), checked on Linux: the GitHub workflow runs exactly
the pytest command the Wine lane runs, every `windows` test file is in it, and the lane
skips with its reason where Wine can't be had, or fails under REQUIRE_WINE=1."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

LANE = ROOT / ".ci" / "windows-lane.sh"
WORKFLOW = ROOT / ".github" / "workflows" / "windows.yml"


def windows_pytest() -> list[str]:
    return list(runpy.run_path(str(ROOT / ".ci" / "windows_lane.py"))["WINDOWS_PYTEST"])


def test_the_workflow_runs_the_lane_s_own_pytest_command() -> None:
    command = " ".join(["python", *windows_pytest()])
    lines = [line.strip() for line in WORKFLOW.read_text(encoding="utf-8").splitlines()]
    assert f"run: {command}" in lines


def test_every_windows_test_file_is_in_the_command() -> None:
    marked = sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"pytest\.mark\.windows\b", path.read_text(encoding="utf-8"))
    )
    assert marked and sorted(a for a in windows_pytest() if a.startswith("tests/")) == marked


def test_ci_runs_the_lane_beside_the_linux_suite_requires_wine_and_fails_with_either() -> None:
    """.ci/run starts the lane (REQUIRE_WINE=1) before pytest, waits for it after, and fails
    when either failed."""
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert run.index("REQUIRE_WINE=1") < run.index("bash .ci/windows-lane.sh")
    started = run.index("bash .ci/windows-lane.sh")
    assert started < run.index("\npytest") < run.index('wait "$lane"')
    assert "pytest || suite=$?" in run and 'wait "$lane" || lane_status=$?' in run
    assert '[ "$suite" != 0 ] || [ "$lane_status" != 0 ]' in run


@pytest.mark.parametrize("required", [False, True])
def test_without_wine_the_lane_skips_with_its_reason_or_fails_when_required(
    tmp_path: Path, required: bool
) -> None:
    """A PATH with no wine and no MinGW, and no install allowed: skipped (exit 0) naming
    what is missing; with REQUIRE_WINE=1, exit 1 saying so."""
    for tool in ("bash", "dirname", "id", "date"):
        found = shutil.which(tool)
        assert found is not None
        (tmp_path / tool).symlink_to(found)
    env = {"PATH": str(tmp_path), "SITE_PIPELINE_WINE_INSTALL": "0", "HOME": str(tmp_path)}
    if required:
        env["REQUIRE_WINE"] = "1"
    bash = shutil.which("bash") or "bash"
    done = subprocess.run(
        [bash, str(LANE)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert "missing: wine wine64 gcc-mingw-w64-x86-64-win32" in output, output
    if required:
        assert done.returncode == 1 and "FAILED" in output and "REQUIRE_WINE=1" in output
    else:
        assert done.returncode == 0 and "SKIPPED" in output
    assert not (tmp_path / ".cache").exists()  # nothing was built
    assert os.environ.get("REQUIRE_WINE") != "0"
