"""Benchmark what learned timeouts add at flow start: reading 1,000 sites x 20 runs of history.

    python bench/history.py            # embedded default (SQLite) and a server on PostgreSQL

Each backend gets 20 earlier runs' summary tables of 1,000 sites (as the flow writes them),
then the flow's start-up work is timed: one read of the tables, each site's durations, each
site's timeout. The target (issue 10) is at most 2 s on both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SITES, RUNS, TARGET_S = 1000, 20, 2.0


def inner() -> dict[str, float]:
    """Seed and measure against the current Prefect API (run in a fresh process)."""
    import random

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    from flows.config import LearnedTimeout
    from flows.engine import baselines as history
    from flows.timeouts import site_timeouts

    sites = [f"site-{n:04d}.example.com" for n in range(SITES)]
    with get_client(sync_client=True) as client:
        for _ in range(RUNS):
            rows = [
                {
                    "site": site,
                    "status": "succeeded",
                    "attempts": 1,
                    "exit_code": 0,
                    "duration_s": round(random.uniform(60, 240), 2),  # noqa: S311 - not a secret
                    "last_stderr": "",
                    "result": '{"records":123}',
                    "check": "",
                    "check_field": None,
                    "check_value": None,
                    "timeout_s": 3600,
                }
                for site in sites
            ]
            client.create_artifact(
                ArtifactCreate(
                    key=history.SUMMARY_KEY, type="table", data=rows, description="bench"
                )
            )
    learned = LearnedTimeout(factor=3.0, min_runs=5, window=20, floor=60)
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        tables = history.summary_tables()
        durations = history.success_durations(sites, learned.window, tables)
        timeouts = site_timeouts(sites, durations, learned, 3600)
        timings.append(time.perf_counter() - started)
        assert len(timeouts) == SITES and all(len(v) == RUNS for v in durations.values())
    return {"best_s": min(timings), "worst_s": max(timings)}


def measure(env: dict[str, str]) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--inner"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    if parser.parse_args().inner:
        print(json.dumps(inner()))
        return 0
    from tests.support.servers import (
        postgres_database,
        postgres_problem,
        prefect_env,
        prefect_server,
    )

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base["PYTHONPATH"] = str(ROOT)
    results: dict[str, dict[str, float] | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "embedded"
        results["embedded SQLite"] = measure(
            {**base, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        )
        problem = postgres_problem()
        if problem:
            results["server on PostgreSQL"] = f"skipped: {problem}"
        else:
            pg_home = Path(tmp) / "pg"
            with postgres_database() as url, prefect_server(pg_home, url) as api:
                results["server on PostgreSQL"] = measure(prefect_env(pg_home / "client", api))
    print(f"learned timeouts at flow start: {SITES} sites x {RUNS} runs, target <= {TARGET_S} s")
    print("| backend | best of 3 | worst of 3 | share of the 2 s budget |")
    print("|---|---|---|---|")
    for name, value in results.items():
        if isinstance(value, str):
            print(f"| {name} | {value} | | |")
        else:
            share = value["worst_s"] / TARGET_S
            print(f"| {name} | {value['best_s']:.2f} s | {value['worst_s']:.2f} s | {share:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
