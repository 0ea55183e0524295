"""The reaper: what it kills when its parent dies, and what it leaves alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.process import groups as procgroup
from flows.process import procfs
from tests.support.processes import alive, wait_until_gone

REAPER = Path(procgroup.__file__).with_name("_reaper.py")
pytestmark = pytest.mark.slow


def reap(lines: list[str]) -> None:
    """Run the reaper with these registrations, then end its input as a dying parent would."""
    subprocess.run(
        [sys.executable, "-I", str(REAPER)],
        input="".join(f"{line}\n" for line in lines).encode(),
        timeout=30,
        check=True,
    )


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times come from /proc")
def test_the_reaper_kills_a_registered_process_but_not_a_reused_pid() -> None:
    """A pid registered with its start time is killed; the same pid with another start time
    (the number was reused by a new process) is left alone."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        start = procfs.start_time(sleeper.pid)
        assert start
        reap([f"+p{sleeper.pid}:{int(start) + 1}"])  # someone else's start time
        assert alive(sleeper.pid)
        reap([f"+p{sleeper.pid}:{start}", f"+p{sleeper.pid + 10**6}:1"])
        sleeper.wait(timeout=10)
        assert wait_until_gone([sleeper.pid], timeout=10) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_forgotten_process_is_left_alone() -> None:
    """`-pPID` takes a registration back: the reaper does not touch that process."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        reap([f"+p{sleeper.pid}:", f"-p{sleeper.pid}"])
        assert alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
