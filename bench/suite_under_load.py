"""The whole test suite, several times in a row, with CPU burners beside it: the proof that
it doesn't go red by chance on a loaded machine (docs/development.md has the result).

    python bench/suite_under_load.py                 # 3 runs of `pytest`, 2 burners
    python bench/suite_under_load.py --runs 1 --burners 4 -- -m "not slow"

Each run is the README's test command (`pytest`, with whatever follows `--`), from this
checkout, with REQUIRE_POSTGRES=1 and REQUIRE_REDIS=1 as in CI. A burner is a Python process
that spins on one core for the whole time. It prints one line per run (its exit status, its
time, pytest's last line) and exits 1 unless every run passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BURN = "while True:\n    pass\n"


@contextmanager
def burners(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` processes that each keep one core busy until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs in a row (default 3)")
    parser.add_argument("--burners", type=int, default=2, help="CPU burners (default 2)")
    parser.add_argument("--log", type=Path, help="keep each run's output as LOG.N")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.burners < 0:
        parser.error("--runs must be 1 or more and --burners 0 or more")

    env = {**os.environ, "REQUIRE_POSTGRES": "1", "REQUIRE_REDIS": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args.pytest_args]
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
        f"{args.burners} burners: {' '.join(command[1:])}",
        flush=True,
    )
    green = 0
    with burners(args.burners):
        for run in range(1, args.runs + 1):
            began = time.monotonic()
            done = subprocess.run(
                command, cwd=ROOT, env=env, capture_output=True, text=True, check=False
            )
            took = time.monotonic() - began
            if args.log:
                Path(f"{args.log}.{run}").write_text(done.stdout + done.stderr)
            green += done.returncode == 0
            print(
                f"run {run}: exit {done.returncode} in {took / 60:.1f} min: "
                f"{last_line(done.stdout)}",
                flush=True,
            )
    print(f"{green} of {args.runs} runs green")
    return 0 if green == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
