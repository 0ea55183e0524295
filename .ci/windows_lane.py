"""The Windows lane's driver (run by .ci/windows-lane.sh with the Linux venv's Python).

It starts a Prefect server on the Linux side (tests/support/servers.py: on a migrated database, a few
seconds) for the end-to-end test, then runs WINDOWS_PYTEST with the Windows CPython under
Wine (`wine PYTHON_EXE ...`), with no terminal (stdin /dev/null, output through a pipe:
python.exe dies at start-up under Wine when its output is a regular file), and returns
pytest's exit status. .github/workflows/windows.yml runs WINDOWS_PYTEST itself on
windows-latest: tests/project/test_wine_lane.py checks the two say the same.

Usage: python .ci/windows_lane.py PYTHON_EXE   (with WINEPREFIX set)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The Windows tests, as both the Wine lane and windows-latest run them (after `python`).
WINDOWS_PYTEST = [
    "-m", "pytest", "-m", "windows", "-n", "0", "-p", "no:cacheprovider", "-rs",
    "tests/process/test_trees_windows.py", "tests/e2e/test_windows.py", "tests/test_metrics.py",
]  # fmt: skip
TIMEOUT = 600  # seconds for the Wine pytest; the lane's target is 3 minutes warm


def main(python_exe: str) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.support.servers import prefect_server

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="site-pipeline-wine-lane-") as folder:
        with prefect_server(Path(folder) / "server") as api:
            print(f"== Windows lane: Prefect server on the Linux side at {api} "
                  f"({time.monotonic() - started:.1f} s)", flush=True)  # fmt: skip
            env = {**os.environ, "SITE_PIPELINE_TEST_API_URL": api, "WINEDEBUG": "-all"}
            for name in ("PREFECT_API_URL", "PREFECT_HOME", "VIRTUAL_ENV", "PYTHONPATH"):
                env.pop(name, None)  # the Linux side's; the tests set their own
            wine = shutil.which("wine") or "wine"
            proc = subprocess.Popen(
                [wine, python_exe, *WINDOWS_PYTEST],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert proc.stdout is not None  # noqa: S101  (a pipe)
            timer = threading.Timer(TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
            timer.start()
            try:
                for line in proc.stdout:
                    sys.stdout.buffer.write(line.replace(b"\r\n", b"\n"))
                    sys.stdout.flush()
                code = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if code == -signal.SIGKILL:
                print(f"== Windows lane: pytest under Wine passed {TIMEOUT} s", flush=True)
    left = windows_pythons()
    if left:
        print(f"== Windows lane: {len(left)} Windows Python processes left: {left}", flush=True)
        code = code or 1
    print(f"== Windows lane: {time.monotonic() - started:.1f} s, pytest exit {code}", flush=True)
    return code


def windows_pythons() -> list[str]:
    """The Windows Python processes of this prefix still running (Wine runs each as a Linux
    process whose command line is the Windows one): none may be left after the tests."""
    prefix = os.environ.get("WINEPREFIX", "")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if argv and argv[0].lower().endswith(b"python.exe") and prefix.encode() in environ:
            found.append(f"{entry.name}: {b' '.join(argv).decode(errors='replace')[:120]}")
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
