"""Benchmark the metrics' file (`pipeline.metrics.textfile`, issue 47): a run's end with
N sites (2,000 by default) that all have earlier values: read the previous file, build the
snapshot, write the new file atomically (`flows.metrics.export`, no Pushgateway). Target:
<= 100 ms for 2,000 sites. Beside it, for scale, the same families through
`prometheus_client.generate_latest` and its parser (what `render` and `read` replace).

    python bench/metrics_write.py                    # 2,000 sites, 7 rounds
    python bench/metrics_write.py --sites 200 --rounds 1

Prints wall and CPU (process) time, the median over the rounds with min-max: on a machine
other sessions load, CPU time is what the code costs, wall time what this run waited.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from flows import metrics, metrics_families, metrics_values  # noqa: E402

STATUSES = ("succeeded", "succeeded", "succeeded", "failed", "timed_out")


def summary(sites: int, night: int) -> dict[str, Any]:
    rows = []
    for index in range(sites):
        status = STATUSES[(index + night) % len(STATUSES)]
        rows.append(
            {
                "site": f"directory-site-{index:05d}.example.com",
                "status": status,
                "attempts": 1 if status == "succeeded" else 3,
                "duration_s": 12.345 + index % 97,
                "peak_rss_mb": 412.3,
                "cpu_s": 8.51,
                "check": {"field": "records", "value": index % 500, "ok": True, "reason": None},
            }
        )
    return {"sites": rows}


def timed(action: Callable[[], object], rounds: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        action()
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return walls, cpus


def show(label: str, walls: list[float], cpus: list[float]) -> str:
    def one(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ms ({min(values):.1f}-{max(values):.1f})"

    return f"| {label} | {one(walls)} | {one(cpus)} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "site_pipeline.prom"
        outputs = metrics.Outputs(state=path, textfile=path)
        groups = {f"directory-site-{i:05d}.example.com": "vendor" for i in range(0, args.sites, 7)}
        warnings = metrics.export(outputs, summary(args.sites, 0), ended=time.time(), groups=groups)
        assert warnings == [], warnings
        nights = iter([summary(args.sites, night) for night in range(1, args.rounds + 1)])

        def one_export() -> None:
            night = next(nights)
            assert metrics.export(outputs, night, ended=time.time(), groups=groups) == []

        export = timed(one_export, args.rounds)
        text = path.read_text(encoding="utf-8")
        before = metrics_families.read(text)
        snapshot = metrics_values.build(summary(args.sites, 0), before, ended=time.time())
        parts = {
            "render (flows.metrics_families)": timed(
                lambda: metrics_families.render(snapshot), args.rounds
            ),
            "read (flows.metrics_families)": timed(
                lambda: metrics_families.read(text), args.rounds
            ),
            "generate_latest (prometheus_client)": timed(
                lambda: generate_latest(metrics_families.registry(snapshot)), args.rounds
            ),
            "parse (prometheus_client)": timed(
                lambda: list(text_string_to_metric_families(text)), args.rounds
            ),
        }
        lines = text.count("\n")
    print(
        f"### Metrics file: {args.sites} sites ({lines} lines, {len(text) // 1024} KiB), "
        f"{args.rounds} rounds, medians (min-max)"
    )
    print()
    print("| step | wall | CPU |")
    print("|---|---|---|")
    print(show("**export: read + build + write (target <= 100 ms)**", *export))
    for label, (walls, cpus) in parts.items():
        print(show(label, walls, cpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
