"""Per-site overhead (issue 30, item 5): threads and Dask, this code and the code before it,
side by side in one invocation, on one `prefect server start` on PostgreSQL.

    python bench/per_site.py                         # 2,000 + 500 sites, then the cap rows
    python bench/per_site.py --sites 500 --dask-sites 200 --rounds 1   # a quick look
    python bench/per_site.py --write BENCHMARKS.md   # the table between its markers

Each row is one real CLI run (`python -m flows run`) with the code's `flows` first on
PYTHONPATH: the code before runs from a `git worktree` of `--before`. Rows, each for both:

- **threads**: `--sites` sites of `true` at cap 16 on threads: sites/s = sites / wall;
- **Dask**: `--dask-sites` sites of `true` at cap 16 on a local cluster of 2 workers: sites/s,
  and the milliseconds of each `submit` of the task runner (median and 90th percentile,
  timed in the flow's process by `bench/submit_timer/sitecustomize.py`);
- **Dask cap**: cap.py's workload (40 sites of 2 s at cap 8) on the same cluster shape:
  efficiency = ideal / work span, ideal = ceil(40 / 8) x 2 s.

The 500-site Dask night's wall time against its ideal is `bench/soak.py --runners dask`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cap import (  # noqa: E402
    SITE,
    code_at,
    efficiency,
    measure,
    pipeline_config,
    say,
    write_between_markers,
)
from tests.support.servers import (  # noqa: E402
    postgres_database,
    postgres_problem,
    prefect_env,
    prefect_server,
)

BEFORE = "4f70569"  # the last commit before issue 30's item 5
TIMER = ROOT / "bench" / "submit_timer"
START, END = "<!-- bench:per-site:start -->", "<!-- bench:per-site:end -->"
DASK = {"kind": "dask", "n_workers": 2}


@dataclass
class Row:
    label: str
    sites: int
    wall: float
    ok: bool
    submit_ms: list[float]
    efficiency: float | None = None


def one_run(
    label: str, code: Path, url: str, folder: Path, sites: list[str], cap: int, **extra: object
) -> Row:
    """One CLI run of `code` against `url`; its submits timed when it runs on Dask."""
    folder.mkdir(parents=True)
    config = pipeline_config(folder, sites, cap, **extra)
    submits = folder / "submits.txt"
    env = prefect_env(
        folder / "client",
        url,
        PYTHONPATH=str(code),
        BENCH_TIMELINE=str(folder / "timeline.tsv"),
        BENCH_SLEEP="2",
    )
    if extra.get("task_runner"):  # the timer imports prefect-dask (and Dask) at start-up,
        # which slows a threads run's flow process by 10-20 % here: only where Dask is used
        env.update(
            PYTHONPATH=os.pathsep.join([str(code), str(TIMER)]), BENCH_SUBMIT_LOG=str(submits)
        )
    argv = [sys.executable, "-m", "flows", "run", "--config", str(config)]
    result = measure(label, argv, env, folder / "timeline.tsv", cwd=folder)
    times = [float(line) * 1000 for line in submits.read_text().split()] if submits.exists() else []
    row = Row(label, len(sites), result.wall, result.ok, times)
    if extra.get("command") is None:  # the sleep workload: its efficiency
        row.efficiency = efficiency(result, math.ceil(len(sites) / cap) * 2.0)
    return row


def cell(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"


def report(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"### Per-site overhead, on `prefect server start` on PostgreSQL "
        f"(`python bench/per_site.py --sites {args.sites} --dask-sites {args.dask_sites} "
        f"--rounds {args.rounds}`, medians of the rounds; before = `{args.before}`)",
        "",
        "| row | code | sites | wall s | sites/s | submit ms, median | submit ms, p90 "
        "| efficiency | all ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        what, code = row.label.rsplit(", ", 1)
        by_key.setdefault((what, code), []).append(row)
    for (what, code), group in by_key.items():
        wall = statistics.median(r.wall for r in group)
        submits = [t for r in group for t in r.submit_ms[1:]]  # the first one starts the cluster
        effs = [r.efficiency for r in group if r.efficiency is not None]
        eff = f"{statistics.median(effs):.3f}" if effs else "-"
        sites = group[0].sites
        lines.append(
            f"| {what} | {code} | {sites} | {wall:.1f} | {sites / wall:.1f} | "
            f"{cell(submits, 0.5)} | {cell(submits, 0.9)} | {eff} | "
            f"{all(r.ok for r in group)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=2000, help="`true` sites on threads")
    parser.add_argument("--dask-sites", type=int, default=500, help="`true` sites on Dask")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default=BEFORE, help="the code before (a git revision)")
    parser.add_argument("--write", help="replace the per-site section of this markdown file")
    args = parser.parse_args()
    problem = postgres_problem()
    if problem:
        print(f"bench/per_site.py needs PostgreSQL: {problem}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="bench-per-site-"))
    rows: list[Row] = []
    true = {"command": ["true", "{site}"], "max_log_lines": 20}
    with (
        code_at(args.before, work / "before") as before,
        postgres_database(fresh=True) as database,
        prefect_server(work / "server", database) as url,
    ):
        one_run("warm-up, now", ROOT, url, work / "warm", ["warm"], 1)
        for n in range(args.rounds):
            say(f"round {n + 1}/{args.rounds}")
            codes = [("before", before), ("now", ROOT)]
            for name, code in codes if n % 2 == 0 else codes[::-1]:
                tag = f"r{n}-{name}"
                steps: list[tuple[str, list[str], int, dict[str, object]]] = [
                    ("threads, `true`", [f"t{i}" for i in range(args.sites)], 16, true),
                    (
                        "Dask (2 workers), `true`",
                        [f"d{i}" for i in range(args.dask_sites)],
                        16,
                        {**true, "task_runner": DASK},
                    ),
                    (
                        "Dask (2 workers), 40 sites of 2 s at cap 8",
                        [f"c{i}" for i in range(40)],
                        8,
                        {"task_runner": DASK},
                    ),
                ]
                for step, (what, sites, cap, extra) in enumerate(steps):
                    row = one_run(
                        f"{what}, {name}", code, url, work / f"{tag}-{step}", sites, cap,
                        **extra,
                    )  # fmt: skip
                    rows.append(row)
                    say(
                        f"  {row.label}: {row.wall:.1f} s, {len(sites) / row.wall:.1f} "
                        f"sites/s, submit median {cell(row.submit_ms[1:], 0.5)} ms, "
                        f"efficiency {row.efficiency}, ok {row.ok}"
                    )
    text = report(rows, args)
    say(text)
    (work / "rows.json").write_text(json.dumps([r.__dict__ for r in rows]))
    say(f"(work folder: {work}; sleep site: {SITE.name})")
    if args.write:
        write_between_markers(Path(args.write), text, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
