"""Benchmark the concurrency cap: site-pipeline (embedded SQLite, a local Dask cluster, a
server on PostgreSQL, a CSRF-protected server), GNU parallel and plain asyncio on one
workload, side by side, in one invocation.

    python bench/cap.py                      # N=40, T=2 s, C=8, retry and scale scenarios
    python bench/cap.py --write BENCHMARKS.md   # replaces the results parts of the file
    python bench/cap.py --runners night --write BENCHMARKS.md   # only the night and groups
    python bench/cap.py --runners night --night-scale 0.1       # a quick look: ~6 s bound

`--runners night` is the heterogeneous night and the group-cap row (`bench/night.py` says
what they are, their bounds and their targets), written between their own markers.

Every site process appends its own start and end times to a file; from those:
wall (command start to exit), work span (first site start to last site end),
efficiency = ideal / span with ideal = ceil(N/C) * T, max overlap, and ratios to GNU parallel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import night  # noqa: E402
from tests.support.servers import (  # noqa: E402
    postgres_database,
    postgres_problem,
    prefect_env,
    prefect_server,
)
from tests.support.timeline import max_overlap as overlap  # noqa: E402  (needs ROOT on sys.path)
from tests.support.timeline import read_timeline  # noqa: E402

SITE = ROOT / "bench" / "sleep_site.py"
BIN = Path(sys.executable).parent


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Result:
    runner: str
    wall: float
    span: float | None = None
    overlap: int | None = None
    first_start: float | None = None  # seconds from command start to the first site start
    ok: bool = True
    peak_rss_mb: float | None = None
    peak_threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def measure(
    runner: str, argv: list[str], env: dict[str, str], timeline: Path, cwd: Path = ROOT
) -> Result:
    """Run argv, sampling the top process's RSS and threads; read the timeline afterwards."""
    started_wall = time.time()
    started = time.monotonic()
    log = (timeline.parent / f"{runner}.log").open("wb")
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    peak_rss = peak_threads = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak_rss = max(peak_rss, watched.memory_info().rss)
            peak_threads = max(peak_threads, watched.num_threads())
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.monotonic() - started
    log.close()
    rows = read_timeline(timeline)
    result = Result(
        runner,
        wall,
        ok=proc.returncode == 0,
        peak_rss_mb=peak_rss / 2**20,
        peak_threads=peak_threads,
    )
    if rows:
        result.span = rows[-1][2] - rows[0][2]
        result.overlap = overlap(rows)
        result.first_start = rows[0][2] - started_wall
    return result


def pipeline_config(folder: Path, sites: list[str], cap: int, **extra: Any) -> Path:
    body: dict[str, Any] = {
        "sites": sites,
        "command": ["{python}", "-I", "-S", str(SITE), "{site}", "--attempt", "{attempt}"],
        "default_flags": [],
        "max_concurrent_sites": cap,
        "retry_count": 1,
        "retry_delay": 0,
        "retry_jitter": 0,
        "concurrency_tag": "bench",
        "async_settings": {"progress_reporting": True, "error_aggregation": True},
        "output_dir": str(folder / "output"),
    }
    body.update(extra)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"pipeline": body}))
    return path


def run_pipeline(
    runner: str, folder: Path, env: dict[str, str], sites: list[str], cap: int, **extra: Any
) -> Result:
    folder.mkdir(parents=True, exist_ok=True)
    config = pipeline_config(folder, sites, cap, **extra)
    summary = folder / "summary.json"
    argv = [
        str(BIN / "site-pipeline"),
        "run",
        "--config",
        str(config),
        "--summary-json",
        str(summary),
    ]
    result = measure(runner, argv, env, folder / "timeline.tsv")
    if summary.exists():
        result.extra["counts"] = json.loads(summary.read_text())["counts"]
    return result


def run_parallel(folder: Path, env: dict[str, str], sites: list[str], cap: int) -> Result:
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["parallel", "-j", str(cap), sys.executable, "-I", "-S", str(SITE), "{}", ":::", *sites]
    return measure("GNU parallel", argv, env, folder / "timeline.tsv")


def run_asyncio(folder: Path, env: dict[str, str], sites: list[str], cap: int) -> Result:
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, __file__, "--asyncio-worker", str(cap), *sites]
    return measure("plain asyncio", argv, env, folder / "timeline.tsv")


async def asyncio_worker(cap: int, sites: list[str]) -> int:
    """The original design note's runner: a semaphore and create_subprocess_exec."""
    semaphore = asyncio.Semaphore(cap)

    async def one(site: str) -> bool:
        async with semaphore:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-I", "-S", str(SITE), site)
            return await proc.wait() == 0

    results = await asyncio.gather(*(one(site) for site in sites))
    return 0 if all(results) else 1


def efficiency(result: Result, ideal: float) -> float | None:
    return ideal / result.span if result.span else None


def table(results: list[Result], ideal: float, reference: Result | None) -> list[str]:
    lines = [
        "| runner | wall s | work span s | efficiency | max overlap | first site after s "
        "| wall / parallel | span / parallel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        eff = efficiency(r, ideal)
        ratio_wall = f"{r.wall / reference.wall:.2f}" if reference else "-"
        ratio_span = (
            f"{r.span / reference.span:.2f}" if reference and r.span and reference.span else "-"
        )
        lines.append(
            f"| {r.runner}{'' if r.ok else ' (FAILED)'} | {r.wall:.2f} | "
            f"{r.span:.2f} | {eff:.3f} | {r.overlap} | {r.first_start:.2f} | {ratio_wall} | "
            f"{ratio_span} |"
            if r.span is not None and eff is not None and r.first_start is not None
            else f"| {r.runner} (no sites ran) | {r.wall:.2f} | - | - | - | - | - | - |"
        )
    return lines


def cap_report(args: argparse.Namespace, runners: list[str], work: Path) -> str:
    """The cap table, the retry scenario and the scale run, as markdown."""
    sites = [f"site-{i:03d}" for i in range(args.n)]
    ideal = math.ceil(args.n / args.c) * args.t
    home = work / "prefect-home"  # the embedded default's ~/.prefect, warmed up once
    embedded_env = prefect_env(home, BENCH_SLEEP=str(args.t))
    report: list[str] = []
    results: list[Result] = []
    retry: list[str] = []
    scale: list[str] = []

    def sitelines(folder: Path, env: dict[str, str]) -> dict[str, str]:
        return {**env, "BENCH_TIMELINE": str(folder / "timeline.tsv")}

    if "embedded" in runners:
        say("warming up the embedded default (database creation and migrations)...")
        warm = work / "warmup"
        run_pipeline("warm-up", warm, sitelines(warm, embedded_env), ["warm"], 1)
        say("site-pipeline, embedded default...")
        folder = work / "embedded"
        results.append(
            run_pipeline(
                "site-pipeline, embedded SQLite",
                folder,
                sitelines(folder, embedded_env),
                sites,
                args.c,
            )
        )
    servers = contextlib.ExitStack()
    pg_url: str | None = None

    def server_row(
        key: str, label: str, database_url: str | None, settings: dict[str, str] | None = None
    ) -> str:
        """Start a `prefect server start`, warm it up, and run the cap workload on it."""
        say(f"site-pipeline, {label}...")
        url = servers.enter_context(
            prefect_server(work / f"{key}-home", database_url, settings=settings)
        )
        env = prefect_env(work / f"{key}-client", url, BENCH_SLEEP=str(args.t))
        warm = work / f"{key}-warmup"
        run_pipeline("warm-up", warm, sitelines(warm, env), ["warm"], 1)
        folder = work / key
        results.append(
            run_pipeline(f"site-pipeline, {label}", folder, sitelines(folder, env), sites, args.c)
        )
        if key == "postgres" and "dask" in runners:
            say("site-pipeline, local Dask cluster of 2 workers, server on PostgreSQL...")
            folder = work / "dask-postgres"
            results.append(
                run_pipeline(
                    "site-pipeline, Dask (2 local workers), server on PostgreSQL",
                    folder,
                    sitelines(folder, env),
                    sites,
                    args.c,
                    task_runner={"kind": "dask", "n_workers": 2},
                )
            )
        return url

    if "dask" in runners:
        say("site-pipeline, embedded default, on a local Dask cluster of 2 workers...")
        folder = work / "dask"
        results.append(
            run_pipeline(
                "site-pipeline, Dask (2 local workers), embedded SQLite",
                folder,
                sitelines(folder, embedded_env),
                sites,
                args.c,
                task_runner={"kind": "dask", "n_workers": 2},
            )
        )
    if "postgres" in runners:
        problem = postgres_problem()
        if problem:
            say(f"skipping PostgreSQL: {problem}")
        else:
            database_url = servers.enter_context(postgres_database())
            pg_url = server_row("postgres", "server on PostgreSQL", database_url)
    if "csrf" in runners:
        server_row(
            "csrf",
            "server with CSRF protection (SQLite)",
            None,
            settings={"PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true"},
        )
    try:
        reference = None
        if "parallel" in runners:
            say("GNU parallel...")
            folder = work / "parallel"
            reference = run_parallel(folder, sitelines(folder, embedded_env), sites, args.c)
            results.append(reference)
        if "asyncio" in runners:
            say("plain asyncio...")
            folder = work / "asyncio"
            results.append(run_asyncio(folder, sitelines(folder, embedded_env), sites, args.c))

        report += [
            f"### Cap: N={args.n} sites x T={args.t:g} s, C={args.c} (ideal {ideal:g} s)",
            "",
            *table(results, ideal, reference),
        ]

        # Retry scenario: C=1; `flaky` fails once, waits retry_delay; `normal` must run meanwhile.
        retry_envs = [("embedded SQLite", embedded_env)] if "embedded" in runners else []
        if pg_url:
            retry_envs.append(
                ("server on PostgreSQL", prefect_env(work / "pg-client", pg_url, BENCH_SLEEP="1"))
            )
        retry += [
            f"### Retry delay holds no slot: C=1, `flaky` fails once then waits "
            f"{args.retry_delay:g} s, `normal` takes 1 s",
            "",
            "| runner | normal started | flaky retried | normal ran during the delay |",
            "|---|---|---|---|",
        ]
        for name, env in retry_envs:
            say(f"retry scenario, {name}...")
            folder = work / f"retry-{name.split()[0]}"
            env = {**sitelines(folder, env), "BENCH_SLEEP": "1"}
            run_pipeline(
                f"retry {name}",
                folder,
                env,
                ["flaky", "normal"],
                1,
                retry_count=2,
                retry_delay=args.retry_delay,
            )
            rows = read_timeline(folder / "timeline.tsv")
            flaky = [t for s, w, t in rows if s == "flaky" and w == "start"]
            normal = [t for s, w, t in rows if s == "normal" and w == "start"]
            if len(flaky) == 2 and normal:
                during = flaky[0] < normal[0] < flaky[1]
                retry.append(
                    f"| {name} | {normal[0] - flaky[0]:.2f} s after flaky's 1st start "
                    f"| {flaky[1] - flaky[0]:.2f} s after | {'yes' if during else 'NO'} |"
                )
            else:
                retry.append(f"| {name} | ? | ? | runs missing: {rows} |")

        if args.scale and "embedded" in runners:
            say(f"scale: {args.scale} sites of `true`, C={args.scale_cap}, embedded default...")
            folder = work / "scale"
            result = run_pipeline(
                "scale",
                folder,
                sitelines(folder, embedded_env),
                [f"s{i}" for i in range(args.scale)],
                args.scale_cap,
                command=["true", "{site}"],
                max_log_lines=20,
            )
            throughput = args.scale / result.wall
            scale += [
                f"### Scale: {args.scale} sites of `true`, C={args.scale_cap}, embedded default",
                "",
                "| sites | wall s | sites/s | peak RSS of the flow process | peak threads "
                f"(limit C+32 = {args.scale_cap + 32}) | all succeeded |",
                "|---|---|---|---|---|---|",
                f"| {args.scale} | {result.wall:.1f} | {throughput:.1f} | "
                f"{result.peak_rss_mb:.0f} MB | {result.peak_threads} | "
                f"{result.extra.get('counts', {}).get('succeeded') == args.scale} |",
            ]
    finally:
        servers.close()

    return "\n".join([*report, "", *retry, "", *scale])


def night_env(work: Path, server: str, stack: contextlib.ExitStack) -> dict[str, str]:
    """The clients' environment for the night's one Prefect API, warmed up by one run: the
    embedded default (one PREFECT_HOME, so the history stays) or a server on PostgreSQL."""
    if server == "postgres":
        problem = postgres_problem()
        if problem:
            raise SystemExit(f"--night-server postgres: {problem}")
        database_url = stack.enter_context(postgres_database())
        url = stack.enter_context(prefect_server(work / "night-server", database_url))
        env = prefect_env(work / "night-client", url)
    else:
        env = prefect_env(work / "night-home")
    say(f"night: warming up the {server} Prefect...")
    warm = work / "night-warmup"
    warm_env = {**env, "BENCH_TIMELINE": str(warm / "timeline.tsv"), "BENCH_SLEEP": "0"}
    run_pipeline("warm-up", warm, warm_env, ["warm"], 1)
    return env


def succeeded(result: Result, sites: int) -> str:
    """`yes` when the summary counts every site as succeeded (GNU parallel: exit 0)."""
    counts = result.extra.get("counts")
    done = result.ok if counts is None else result.ok and counts.get("succeeded") == sites
    return "yes" if done else "NO"


def order_line(log: Path) -> str:
    """What the run said about its start order (`order: ...`), or `-` if it said nothing."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    found = re.search(r"\border: [^\n|]*", text)
    return found.group(0).strip() if found else "-"


def night_rows(
    env: dict[str, str], work: Path, durations: dict[str, float]
) -> list[tuple[Result, float]]:
    """The night's runs, each with the span its order simulates to: a first night that
    records the history, then with it (longest first), `order: listed`, GNU parallel."""
    sites, cap = list(durations), night.NIGHT_CAP
    listed = night.simulate(list(durations.values()), cap)
    longest = night.simulate(sorted(durations.values(), reverse=True), cap)

    def one(key: str, label: str, **extra: Any) -> Result:
        say(f"night: {label}...")
        folder = work / key
        site_env = {**env, "BENCH_TIMELINE": str(folder / "timeline.tsv")}
        result = run_pipeline(label, folder, site_env, sites, cap, **extra)
        result.extra["order"] = order_line(folder / f"{label}.log")
        return result

    rows = [
        (one("night-first", "site-pipeline, first night (no history yet)"), listed),
        (one("night-history", "site-pipeline, with history (order: longest_first)"), longest),
        (one("night-listed", "site-pipeline, order: listed", order="listed"), listed),
    ]
    say("night: GNU parallel...")
    folder = work / "night-parallel"
    parallel = run_parallel(
        folder, {**env, "BENCH_TIMELINE": str(folder / "timeline.tsv")}, sites, cap
    )
    parallel.runner = "GNU parallel, list order"
    return [*rows, (parallel, listed)]


def night_table(
    args: argparse.Namespace, durations: dict[str, float], rows: list[tuple[Result, float]]
) -> list[str]:
    """The night's table: span / lower bound per runner, next to what its order simulates to
    and the order line the run logged."""
    cap = night.NIGHT_CAP
    bound = night.lower_bound(durations, cap)
    longest = max(durations, key=lambda site: durations[site])
    lines = [
        f"### Heterogeneous night: {len(durations)} sites, log-normal durations "
        f"(sigma {night.SIGMA:g}, seed {args.night_seed}), C={cap}",
        "",
        f"Lower bound max(sum / C, longest site) = max({sum(durations.values()) / cap:.1f}, "
        f"{durations[longest]:.1f}) = {bound:.1f} s; the longest site is at position "
        f"{list(durations).index(longest) + 1} of {len(durations)} in the list. "
        "Target: span / lower bound <= 1.05 with history.",
        "",
        "| runner | work span s | span / lower bound | simulated (same order, no overhead) "
        f"| max overlap (cap {cap}) | all succeeded | the run's order line |",
        "|---|---|---|---|---|---|---|",
    ]
    for result, simulated in rows:
        said = result.extra.get("order", "-")
        if result.span is None:
            lines.append(
                f"| {result.runner} (no sites ran) | - | - | {simulated / bound:.3f} | - | NO "
                f"| {said} |"
            )
            continue
        lines.append(
            f"| {result.runner} | {result.span:.2f} | {result.span / bound:.3f} | "
            f"{simulated / bound:.3f} | {result.overlap} | {succeeded(result, len(durations))} "
            f"| {said} |"
        )
    first = rows[0][0]
    if first.span is None or succeeded(first, len(durations)) != "yes":
        lines += ["", "The first night did not succeed on every site: the history is incomplete."]
    return lines


def cause_lines(env: dict[str, str], work: Path, workload: dict[str, float]) -> list[str]:
    """The group-cap row: run it, then check its efficiency and every cap on the timeline."""
    cap = night.GROUP_CAP
    ideal = night.group_ideal(workload, night.GROUPS, cap)
    say("groups: site-pipeline with group caps...")
    folder = work / "groups"
    site_env = {**env, "BENCH_TIMELINE": str(folder / "timeline.tsv")}
    result = run_pipeline(
        "site-pipeline, group caps, order: listed",
        folder,
        site_env,
        list(workload),
        cap,
        order="listed",
        groups=night.group_config(),
    )
    peaks = night.group_peaks(read_timeline(folder / "timeline.tsv"))
    held = (result.overlap or 0) <= cap and all(
        peaks[group] <= group_cap for group, group_cap in night.GROUPS.items()
    )
    per_group = {
        g: sum(d for s, d in workload.items() if night.group_of(s) == g) / c
        for g, c in night.GROUPS.items()
    }
    free = len(workload) - night.GROUP_SITES * len(night.GROUPS)
    groups_text = " and ".join(
        f"`{g}` ({night.GROUP_SITES} sites, cap {c})" for g, c in night.GROUPS.items()
    )
    t = next(iter(workload.values()))
    lines = [
        f"### Group caps: {len(workload)} sites x {t:g} s under a global cap of {cap}: "
        f"groups {groups_text} listed first, {free} sites in no group",
        "",
        f"Ideal max(sum / C, max over groups of sum_g / cap_g, longest site) = "
        f"max({sum(workload.values()) / cap:.1f}, "
        + ", ".join(f"{v:.1f}" for v in per_group.values())
        + f", {max(workload.values()):.1f}) = {ideal:.1f} s. Target: efficiency = ideal / span "
        ">= 0.9, and no moment above any cap.",
        "",
        f"| runner | work span s | efficiency | max overlap (cap {cap}) | "
        + " | ".join(f"{g} at once (cap {c})" for g, c in night.GROUPS.items())
        + " | caps held | all succeeded |",
        "|---|---|---|---|" + "---|" * len(night.GROUPS) + "---|---|",
    ]
    span = f"{result.span:.2f} | {ideal / result.span:.3f}" if result.span else "- | -"
    lines.append(
        f"| {result.runner} | {span} | {result.overlap} | "
        + " | ".join(str(peaks[g]) for g in night.GROUPS)
        + f" | {'yes' if held else 'NO'} | {succeeded(result, len(workload))} |"
    )
    return lines


def night_report(args: argparse.Namespace, work: Path) -> str:
    """The heterogeneous night and the group-cap row, on one Prefect API, as markdown."""
    scale = args.night_scale
    durations = {
        site: round(seconds * scale, 3)
        for site, seconds in night.night_durations(args.night_seed).items()
    }
    workload = night.group_workload(night.GROUP_T_S * scale)
    file = work / "night-durations.json"
    file.write_text(json.dumps({**durations, **workload}))
    with contextlib.ExitStack() as stack:
        env = {**night_env(work, args.night_server, stack), "BENCH_DURATIONS": str(file)}
        rows = night_rows(env, work, durations)
        groups = cause_lines(env, work, workload)
    return "\n".join([*night_table(args, durations, rows), "", *groups])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--t", type=float, default=2.0)
    parser.add_argument("--c", type=int, default=8)
    parser.add_argument("--scale", type=int, default=5000, help="sites in the scale run (0: skip)")
    parser.add_argument("--scale-cap", type=int, default=16)
    parser.add_argument("--retry-delay", type=float, default=10.0)
    parser.add_argument(
        "--runners",
        default="embedded,dask,postgres,csrf,parallel,asyncio,night",
        help="night: the heterogeneous night and the group-cap row (alone: only those)",
    )
    parser.add_argument(
        "--night-scale", type=float, default=1.0, help="durations x this (0.1: ~6 s bound)"
    )
    parser.add_argument("--night-seed", type=int, default=night.SEED)
    parser.add_argument("--night-server", choices=["embedded", "postgres"], default="embedded")
    parser.add_argument("--write", metavar="FILE", help="write the report (markdown) here")
    parser.add_argument("--asyncio-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.asyncio_worker:
        cap, *sites = args.asyncio_worker
        return asyncio.run(asyncio_worker(int(cap), sites))

    runners = args.runners.split(",")
    if {"parallel", "night"} & set(runners) and not shutil.which("parallel"):
        print("GNU parallel is missing: apt-get install parallel", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-cap-"))
    command = "python bench/cap.py " + " ".join(sys.argv[1:])
    footer = (
        f"Produced by `{command.strip()}` "
        f"on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Logs: {work}"
    )
    sections: list[tuple[str, str, str]] = []  # (text, start marker, end marker)
    try:
        if any(runner != "night" for runner in runners):
            sections.append((f"{cap_report(args, runners, work)}\n\n{footer}", START, END))
        if "night" in runners:
            sections.append((f"{night_report(args, work)}\n\n{footer}", NIGHT_START, NIGHT_END))
    finally:
        stop_kept_servers(work)
    for text, start, end in sections:
        print(text)
        if args.write:
            write_between_markers(Path(args.write), text, start, end)
    return 0


@contextlib.contextmanager
def code_at(revision: str, folder: Path) -> Iterator[Path]:
    """A `git worktree` of `revision` at `folder` (the code before, for side-by-side rows: its
    `flows` goes first on PYTHONPATH), removed at the end."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(folder), revision],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield folder
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, check=False,
            capture_output=True,
        )  # fmt: skip


def stop_kept_servers(work: Path) -> None:
    """`site-pipeline server stop` in every PREFECT_HOME under `work` where an embedded run
    kept its local server (`local_server_idle`): the benchmark leaves nothing running."""
    for state in work.rglob("local-server.json"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env["PREFECT_HOME"] = str(state.parent)
        subprocess.run(
            [str(BIN / "site-pipeline"), "server", "stop"],
            env=env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip


START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"
NIGHT_START, NIGHT_END = "<!-- bench:night:start -->", "<!-- bench:night:end -->"


def write_between_markers(path: Path, text: str, start: str = START, end: str = END) -> None:
    """Replace the generated part of `path` (between the markers `start` and `end`, added at
    the end if missing), keeping the prose and any other generated part."""
    old = path.read_text() if path.exists() else f"{start}\n{end}\n"
    if start not in old or end not in old:
        old = f"{old.rstrip()}\n\n{start}\n{end}\n"
    head, rest = old.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
