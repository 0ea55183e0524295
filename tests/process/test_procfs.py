"""`flows.process.procfs`: Linux's /proc read in one place."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flows.process import procfs

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")


def test_children_map_lists_each_child_under_its_parent() -> None:
    """One pass over /proc gives every process's children by parent pid: a child we just
    started is under our pid, its own child under its pid, and neither under the other."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            "print(g.pid, flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    grandchild: int | None = None
    try:
        assert child.stdout is not None
        grandchild = int(child.stdout.readline())
        kids = procfs.children_map()
        assert kids is not None
        assert child.pid in kids[os.getpid()]
        assert kids[child.pid] == [grandchild]
        assert grandchild not in kids.get(os.getpid(), [])
    finally:
        child.kill()
        child.wait()
        if grandchild is not None:
            try:
                os.kill(grandchild, 9)
            except ProcessLookupError:
                pass
