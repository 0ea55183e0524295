"""`local_server_idle: 0` two ways, side by side: Prefect's temporary server per run (the code
at `--before`) and the kept server with zero idle time (this code: the keeper stops it as
soon as the last run on it leaves).

    python bench/zero_idle.py                    # 3 rounds, before = f5231b8
    python bench/zero_idle.py --rounds 5 --write BENCHMARKS.md
    python bench/zero_idle.py --before HEAD --kept-idle 0.01   # both ways on one code

The code before runs from a `git worktree` of `--before` (its `flows` first on PYTHONPATH,
the same interpreter and packages). Each round runs a run of three 0.3 s sites on the
embedded default (no PREFECT_API_URL) each way, the order alternating from round to round,
on a fresh PREFECT_HOME (an empty folder: the server migrates its database as it starts) and
on a warm one (its database already migrated, as on a machine that has run once).

"first site" is the time from the command's start to the first site's start (the sites'
timeline), "wall" the whole command, "server gone" the time from the command's end until no
Prefect server process of that home is left (the temporary server is stopped by the command
itself, inside its wall; the kept one by its keeper, after the command). "CPU" is the
command's and every process it reaped (the temporary server among them), plus the keeper's
and its server's, sampled every 0.1 s until they end (they are not the command's to reap):
on a loaded machine the times swing with the load, the CPU much less.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cap import (  # noqa: E402
    Result,
    code_at,
    measure,
    pipeline_config,
    stop_kept_servers,
    write_between_markers,
)
from tests.support.servers import prefect_env, seed_home  # noqa: E402

BEFORE = "f5231b8"  # the last commit with a temporary server for `local_server_idle: 0`
SITES = ["one.example", "two.example", "three.example"]
START, END = "<!-- bench:zero-idle:start -->", "<!-- bench:zero-idle:end -->"
TEMPORARY, KEPT = "temporary server", "kept server, zero idle"
HOMES = ("fresh", "warm")


def say(text: str) -> None:
    print(text, flush=True)


def servers_of(home: Path) -> list[psutil.Process]:
    """The Prefect server processes (and keepers) whose PREFECT_HOME is `home`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(proc.info["cmdline"] or [])
            if ("prefect" not in line and "keeper" not in line) or "site-pipeline" in line:
                continue
            if proc.environ().get("PREFECT_HOME") == str(home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def gone_after(home: Path, timeout: float = 60.0) -> float:
    """Seconds until no server process of `home` is left (from now)."""
    began = time.monotonic()
    while servers_of(home) and time.monotonic() - began < timeout:
        time.sleep(0.05)
    return time.monotonic() - began


class KeeperCpu(threading.Thread):
    """Samples the CPU seconds of `home`'s keeper and everything under it (its server)."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.home = str(home)
        self.seen: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            for proc in psutil.process_iter(["cmdline"]):
                argv = proc.info["cmdline"] or []
                if "flows.ops.keeper" not in argv or self.home not in argv:
                    continue
                try:
                    for one in [proc, *proc.children(recursive=True)]:
                        times = one.cpu_times()
                        self.seen[one.pid] = times.user + times.system
                except psutil.Error:
                    continue

    def total(self) -> float:
        self.done.set()
        self.join()
        return sum(self.seen.values())


def one_run(label: str, code: Path | None, home: Path, folder: Path, idle: float) -> Result:
    folder.mkdir(parents=True, exist_ok=True)
    path = pipeline_config(folder, SITES, 3, local_server_idle=idle)
    prefix, extra = [sys.executable, "-m", "flows"], {"PYTHONPATH": str(code or ROOT)}
    env = {
        **prefect_env(home, BENCH_SLEEP="0.3"),
        **extra,
        "BENCH_TIMELINE": str(folder / "timeline.tsv"),
    }
    argv = [*prefix, "run", "--config", str(path)]
    sampler = KeeperCpu(home)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = measure(label, argv, env, folder / "timeline.tsv", cwd=folder)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.extra["gone_s"] = gone_after(home)
    reaped = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result.extra["cpu_s"] = reaped + sampler.total()
    if not result.ok:
        raise SystemExit(f"{label}: the run failed; see {folder / (label + '.log')}")
    return result


def table(runs: dict[str, list[Result]], rounds: int, homes: list[str]) -> list[str]:
    lines = [
        f"### `local_server_idle: 0`: a temporary server against the kept server with zero "
        f"idle time ({rounds} rounds, medians; three 0.3 s sites)",
        "",
        "| home | way | first site starts after | wall | CPU | server gone after the command |",
        "|---|---|---|---|---|---|",
    ]
    for home in homes:
        firsts = {}
        for way in (TEMPORARY, KEPT):
            results = runs[f"{home}, {way}"]
            first = statistics.median(r.first_start or 0.0 for r in results)
            wall = statistics.median(r.wall for r in results)
            gone = statistics.median(float(r.extra["gone_s"]) for r in results)
            cpu = statistics.median(float(r.extra["cpu_s"]) for r in results)
            firsts[way] = (first, wall, cpu)
            lines.append(
                f"| {home} | {way} | {first:.1f} s | {wall:.1f} s | {cpu:.1f} s | {gone:.1f} s |"
            )
        t, k = firsts[TEMPORARY], firsts[KEPT]
        ratios = " | ".join(f"{kept / temporary:.2f}" for kept, temporary in zip(k, t, strict=True))
        lines.append(f"| {home} | kept / temporary | {ratios} | |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="the temporary server's code (a rev)")
    parser.add_argument("--kept-idle", type=float, default=0.0, help="the kept way's idle")
    parser.add_argument("--homes", nargs="+", choices=HOMES, default=list(HOMES))
    parser.add_argument("--write", help="replace this section of this markdown file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-zero-idle-"))
    runs: dict[str, list[Result]] = {}
    with contextlib.ExitStack() as stack:
        before = stack.enter_context(code_at(args.before, work / "before"))
        stack.callback(stop_kept_servers, work)  # first, then the worktree goes
        for n in range(args.rounds):
            say(f"round {n + 1}/{args.rounds}")
            ways = [(TEMPORARY, before, 0.0), (KEPT, None, args.kept_idle)]
            if n % 2:
                ways.reverse()
            for home_kind in args.homes:
                for way, code, idle in ways:
                    label = f"{home_kind}, {way}"
                    slug = f"r{n}-{home_kind}-{'temporary' if code else 'kept'}"
                    home = work / f"home-{slug}"
                    if home_kind == "warm":
                        seed_home(home)
                    else:
                        home.mkdir()
                    result = one_run(label, code, home, work / slug, idle)
                    runs.setdefault(label, []).append(result)
                    say(
                        f"  {label}: first site {result.first_start:.1f} s, wall "
                        f"{result.wall:.1f} s, CPU {result.extra['cpu_s']:.1f} s, server gone "
                        f"{result.extra['gone_s']:.1f} s after"
                    )

    lines = table(runs, args.rounds, args.homes)
    lines += [
        "",
        f"Produced by `python bench/zero_idle.py {' '.join(sys.argv[1:])}`, before = "
        f"`{args.before}`, on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Logs: {work}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_between_markers(Path(args.write), text, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
