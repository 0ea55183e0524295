"""Benchmark reading a loud pipeline's output: site-pipeline's `run_attempt` (with the full
log written to disk), GNU parallel and a plain run to /dev/null, side by side, in one run.

    python bench/output_speed.py                     # 200,000 lines (20 MB), 3 rounds
    python bench/output_speed.py --write BENCHMARKS.md  # replaces its output-speed part
    python bench/output_speed.py --flows-from /tmp/old  # run_attempt from another checkout

After one warm-up run of each runner (imports, the reaper process, caches), two scenarios,
each round in this order (the runners take turns, so a busy machine hurts them alike):

- alone: one loud site (`bench/loud_site.py --lines N`) and nothing else;
- two among six: two loud sites and four quiet ones (a short line every 10 ms for 2 s),
  all six at once: `parallel -j6`, or six threads of this process each in `run_attempt`, as
  the flow runs them.

The number is each loud site's own time, start to exit: `run_attempt`'s `duration_s`, the
`JobRuntime` of parallel's `--joblog`, the wall time of a `subprocess.run` to /dev/null. The
table shows the median over the rounds (min-max beside it) and the ratio to GNU parallel;
the target is 1.5.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "bench" / "loud_site.py"
TARGET = 1.5  # a loud site under site-pipeline, at most this many times parallel's time
START, END = "<!-- bench:output:start -->", "<!-- bench:output:end -->"

RunAttempt = Callable[..., Any]


def loud(lines: int) -> list[str]:
    return [sys.executable, "-I", "-S", str(SITE), "--lines", str(lines)]


def quiet(seconds: float) -> list[str]:
    return [sys.executable, "-I", "-S", str(SITE), "--quiet", str(seconds)]


def devnull(argvs: list[list[str]]) -> list[float]:
    """One site alone, its output to /dev/null: the site's own speed."""
    (argv,) = argvs
    started = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return [time.monotonic() - started]


def parallel(argvs: list[list[str]], work: Path) -> list[float]:
    """All sites at once under `parallel -j<n>` (its output to /dev/null); the loud sites'
    JobRuntime, from its joblog."""
    joblog = work / f"joblog-{uuid.uuid4().hex}"
    commands = [shlex.join(argv) for argv in argvs]
    subprocess.run(
        ["parallel", "-j", str(len(argvs)), "--joblog", str(joblog), ":::", *commands],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    times = []
    for row in joblog.read_text().splitlines()[1:]:
        fields = row.split("\t")
        if "--lines" in fields[8]:
            times.append(float(fields[3]))
    return times


def site_pipeline(argvs: list[list[str]], work: Path, run_attempt: RunAttempt) -> list[float]:
    """All sites at once, each in `run_attempt` in a thread of this process (as the flow
    runs them), each writing its full log under `work` when this run_attempt can."""
    can_log = "log_file" in inspect.signature(run_attempt).parameters

    def one(index: int, argv: list[str]) -> tuple[bool, float]:
        more = {"log_file": work / f"site-{index}" / "attempt-1.log"} if can_log else {}
        kept: list[str] = []
        outcome = run_attempt(
            argv,
            cwd=work,
            env=os.environ,
            timeout=600,
            kill_grace=1,
            log=kept.append,
            max_log_lines=200,
            **more,
        )
        if outcome.status != "succeeded":
            raise RuntimeError(f"{argv}: {outcome.error}")
        return "--lines" in argv, outcome.duration_s

    with ThreadPoolExecutor(max_workers=len(argvs)) as pool:
        done = list(pool.map(one, range(len(argvs)), argvs))
    return [seconds for is_loud, seconds in done if is_loud]


def cell(samples: list[float]) -> str:
    return f"{statistics.median(samples):.2f} ({min(samples):.2f}-{max(samples):.2f})"


def report(args: argparse.Namespace, run_attempt: RunAttempt, work: Path) -> str:
    scenarios = {
        "alone": [loud(args.lines)],
        "two among six": [loud(args.lines), loud(args.lines), *[quiet(2.0)] * 4],
    }
    rows = []
    site_pipeline([quiet(0.1)], work, run_attempt)  # warm up: imports, the reaper, caches
    parallel([quiet(0.1)], work)
    for name, argvs in scenarios.items():
        runs: dict[str, list[float]] = {"site-pipeline": [], "GNU parallel": []}
        if name == "alone":
            runs["/dev/null (no runner)"] = []
        for _ in range(args.rounds):
            runs["site-pipeline"] += site_pipeline(argvs, work, run_attempt)
            runs["GNU parallel"] += parallel(argvs, work)
            if name == "alone":
                runs["/dev/null (no runner)"] += devnull(argvs)
        reference = statistics.median(runs["GNU parallel"])
        for runner, samples in runs.items():
            ratio = statistics.median(samples) / reference
            verdict = "" if runner != "site-pipeline" else (" ok" if ratio <= TARGET else " SLOW")
            rows.append(f"| {name} | {runner} | {cell(samples)} | {ratio:.2f}{verdict} |")
    mb = args.lines * 100 / 1e6
    return "\n".join(
        [
            f"### Output speed: a site printing {args.lines:,} lines ({mb:.0f} MB), "
            f"{args.rounds} rounds",
            "",
            "| scenario | runner | loud site s, median (min-max) | / parallel (target "
            f"<= {TARGET}) |",
            "|---|---|---|---|",
            *rows,
        ]
    )


def write_between_markers(path: Path, text: str) -> None:
    """Replace the part of `path` between START and END (added at the end if missing)."""
    old = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in old or END not in old:
        old = f"{old.rstrip()}\n\n{START}\n{END}\n"
    head, rest = old.split(START, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", metavar="FILE", help="write the table (markdown) here")
    parser.add_argument(
        "--flows-from", metavar="DIR", help="import run_attempt from this checkout instead"
    )
    args = parser.parse_args()
    if not shutil.which("parallel"):
        print("GNU parallel is missing: apt-get install parallel", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(args.flows_from).resolve() if args.flows_from else ROOT))
    from flows.process.attempt import run_attempt

    work = Path(tempfile.mkdtemp(prefix="bench-output-"))
    command = "python bench/output_speed.py " + " ".join(sys.argv[1:])
    text = (
        f"{report(args, run_attempt, work)}\n\nProduced by `{command.strip()}` on "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; run_attempt from "
        f"{Path(inspect.getfile(run_attempt)).parent.parent.parent}. Logs: {work}"
    )
    print(text)
    if args.write:
        write_between_markers(Path(args.write), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
