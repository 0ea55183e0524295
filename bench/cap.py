"""Benchmark the concurrency cap: site-pipeline (embedded SQLite, a local Dask cluster, a
server on PostgreSQL, a CSRF-protected server), GNU parallel and plain asyncio on one
workload, side by side, in one invocation.

    python bench/cap.py                      # N=40, T=2 s, C=8, retry and scale scenarios
    python bench/cap.py --write BENCHMARKS.md   # replaces the results part of the file

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
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import (  # noqa: E402
    postgres_database,
    postgres_problem,
    prefect_env,
    prefect_server,
)
from tests.timeline import max_overlap as overlap  # noqa: E402  (needs ROOT on sys.path)
from tests.timeline import read_timeline  # noqa: E402

SITE = ROOT / "bench" / "sleep_site.py"
BIN = Path(sys.executable).parent


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--t", type=float, default=2.0)
    parser.add_argument("--c", type=int, default=8)
    parser.add_argument("--scale", type=int, default=5000, help="sites in the scale run (0: skip)")
    parser.add_argument("--scale-cap", type=int, default=16)
    parser.add_argument("--retry-delay", type=float, default=10.0)
    parser.add_argument("--runners", default="embedded,dask,postgres,csrf,parallel,asyncio")
    parser.add_argument("--write", metavar="FILE", help="write the report (markdown) here")
    parser.add_argument("--asyncio-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.asyncio_worker:
        cap, *sites = args.asyncio_worker
        return asyncio.run(asyncio_worker(int(cap), sites))

    runners = args.runners.split(",")
    if "parallel" in runners and not shutil.which("parallel"):
        print("GNU parallel is missing: apt-get install parallel", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-cap-"))
    sites = [f"site-{i:03d}" for i in range(args.n)]
    ideal = math.ceil(args.n / args.c) * args.t
    home = work / "prefect-home"  # the embedded default's ~/.prefect, warmed up once
    embedded_env = prefect_env(home, BENCH_SLEEP=str(args.t))
    report: list[str] = []
    results: list[Result] = []
    retry: list[str] = []
    scale: list[str] = []
    say: Callable[[str], None] = lambda text: print(text, flush=True)  # noqa: E731

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

    command = "python bench/cap.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            *report,
            "",
            *retry,
            "",
            *scale,
            "",
            f"Produced by `{command.strip()}` "
            f"on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Logs: {work}",
        ]
    )
    print(text)
    if args.write:
        write_between_markers(Path(args.write), text)
    return 0


START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def write_between_markers(path: Path, text: str) -> None:
    """Replace the generated part of `path` (between the markers), keeping the prose."""
    old = path.read_text() if path.exists() else f"{START}\n{END}\n"
    if START not in old or END not in old:
        old = f"{old.rstrip()}\n\n{START}\n{END}\n"
    head, rest = old.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
