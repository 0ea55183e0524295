"""Start-up, side by side with the code before issue 30: the CLI's own time and how soon a
run's first site starts on the embedded default (no PREFECT_API_URL).

    python bench/startup.py                      # 3 rounds, before = 1e7089c
    python bench/startup.py --rounds 5 --write BENCHMARKS.md

The code before runs from a `git worktree` of `--before` (its `flows` first on PYTHONPATH,
the same interpreter and packages). Each round runs, one after another on one machine:

- `site-pipeline --help` and `validate` (each the median of 5), before and now;
- a run of three 0.3 s sites: before (a temporary server per run), now with
  `local_server_idle: 0` (a server that stops with the run: a temporary one until
  `bench/zero_idle.py`'s change, the kept server with no idle time since), now cold (the
  first run: it starts the kept server, on a migrated database) and now reused (the next run on it);
- the same three sites on a local Dask cluster of 2 workers, on that reused server: the code
  before the cluster started early (`--dask-before`, a worktree too) and now.

"first site" is the time from the command's start to the first site's start (the sites'
timeline), "wall" the whole command. Every run's database is already migrated.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cap import (  # noqa: E402
    BIN,
    Result,
    code_at,
    measure,
    pipeline_config,
    stop_kept_servers,
    write_between_markers,
)
from tests.support.servers import prefect_env, seed_home  # noqa: E402

BEFORE = "1e7089c"  # the last commit before issue 30
DASK_BEFORE = "b8515a8"  # the last commit before a run's local cluster started early
DASK = {"task_runner": {"kind": "dask", "n_workers": 2}}
SITES = ["one.example", "two.example", "three.example"]
START, END = "<!-- bench:startup:start -->", "<!-- bench:startup:end -->"


def say(text: str) -> None:
    print(text, flush=True)


def cli(code: Path | None) -> tuple[list[str], dict[str, str]]:
    """The argv prefix and extra environment of the CLI of `code` (None: this checkout's
    installed script)."""
    if code is None:
        return [str(BIN / "site-pipeline")], {}
    return [sys.executable, "-m", "flows"], {"PYTHONPATH": str(code)}


def median_seconds(argv: list[str], env: dict[str, str], cwd: Path, times: int = 5) -> float:
    took = []
    for _ in range(times):
        began = time.monotonic()
        subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=False, timeout=120)
        took.append(time.monotonic() - began)
    return statistics.median(took)


def one_run(label: str, code: Path | None, home: Path, folder: Path, **config: object) -> Result:
    folder.mkdir(parents=True, exist_ok=True)
    path = pipeline_config(folder, SITES, 3, **config)
    prefix, extra = cli(code)
    env = {
        **prefect_env(home, BENCH_SLEEP="0.3"),
        **extra,
        "BENCH_TIMELINE": str(folder / "timeline.tsv"),
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    argv = [*prefix, "run", "--config", str(path)]
    result = measure(label, argv, env, folder / "timeline.tsv", cwd=folder)  # not ROOT's flows
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.extra["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if not result.ok:
        raise SystemExit(f"{label}: the run failed; see {folder / (label + '.log')}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="the code before (a git revision)")
    parser.add_argument("--dask-before", default=DASK_BEFORE, help="the Dask rows' code before")
    parser.add_argument("--write", help="replace the start-up section of this markdown file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    (work / "project").mkdir()
    shutil.copy(ROOT / "config.yaml", work / "project" / "config.yaml")
    shutil.copytree(ROOT / "examples", work / "project" / "examples")
    cli_times: dict[str, list[float]] = {}
    runs: dict[str, list[Result]] = {}
    with contextlib.ExitStack() as stack:
        before = stack.enter_context(code_at(args.before, work / "before"))
        dask_before = stack.enter_context(code_at(args.dask_before, work / "dask-before"))
        stack.callback(stop_kept_servers, work)  # first, then the worktree goes
        for n in range(args.rounds):
            say(f"round {n + 1}/{args.rounds}")
            for name, code in (("before", before), ("now", None)):
                prefix, extra = cli(code)
                env = {**prefect_env(work / "cli-home"), **extra}
                for what, argv in (("--help", ["--help"]), ("validate", ["validate"])):
                    took = median_seconds([*prefix, *argv], env, work / "project")
                    cli_times.setdefault(f"`site-pipeline {what}`, {name}", []).append(took)
            tag = f"r{n}"
            kept = work / f"home-kept-{tag}"
            steps: list[tuple[str, Path | None, Path, dict[str, object]]] = [
                ("before: a temporary server per run", before, work / "home-before", {}),
                ("now, `local_server_idle: 0`", None, work / "home-zero", {"local_server_idle": 0}),
                ("now, kept server, cold (starts it)", None, kept, {}),
                ("now, kept server, reused", None, kept, {}),
                (f"Dask, reused: before (`{args.dask_before}`)", dask_before, kept, DASK),
                ("Dask, reused: now", None, kept, DASK),
            ]
            for step, (label, code, home, config) in enumerate(steps):
                seed_home(home)
                result = one_run(label, code, home, work / f"{tag}-run{step}", **config)
                runs.setdefault(label, []).append(result)
                say(f"  {label}: first site {result.first_start:.1f} s, wall {result.wall:.1f} s")
            stop_kept_servers(work)

    lines = [
        f"### Start-up: the CLI, and a run of three 0.3 s sites on the embedded default "
        f"({args.rounds} rounds, medians)",
        "",
        "| what | seconds |",
        "|---|---|",
    ]
    for label, took in cli_times.items():
        lines.append(f"| {label} | {statistics.median(took):.2f} |")
    lines += [
        "",
        "| run (no PREFECT_API_URL) | first site starts after | wall | CPU of it and its reaped |",
        "|---|---|---|---|",
    ]
    for label, results in runs.items():
        first = statistics.median(r.first_start or 0.0 for r in results)
        wall = statistics.median(r.wall for r in results)
        cpu = statistics.median(float(r.extra["cpu_s"]) for r in results)
        lines.append(f"| {label} | {first:.1f} s | {wall:.1f} s | {cpu:.1f} s |")
    lines += [
        "",
        f"Produced by `python bench/startup.py {' '.join(sys.argv[1:])}`, before = "
        f"`{args.before}`, on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Logs: {work}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_between_markers(Path(args.write), text, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
