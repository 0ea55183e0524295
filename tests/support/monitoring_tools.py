"""The Prometheus tools the monitoring tests run: Debian's `prometheus` (with `promtool`),
`prometheus-node-exporter` and `prometheus-pushgateway` (or the upstream names). A test that
needs one skips with the reason where it is missing; under REQUIRE_PROMETHEUS=1 (.ci/run,
after installing them) it fails instead."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

TOOLS: dict[str, tuple[str, ...]] = {
    "promtool": ("promtool",),
    "prometheus": ("prometheus",),
    "node_exporter": ("prometheus-node-exporter", "node_exporter"),
    "pushgateway": ("prometheus-pushgateway", "pushgateway"),
}
PACKAGES = "apt-get install prometheus prometheus-node-exporter prometheus-pushgateway"


def missing(tool: str) -> str | None:
    """Why `tool` can't be run here, or None."""
    if any(shutil.which(name) for name in TOOLS[tool]):
        return None
    return f"{' or '.join(TOOLS[tool])} not found on PATH ({PACKAGES})"


def tool(name: str) -> str:
    """The path of `name`; skips the test where it is missing, fails under
    REQUIRE_PROMETHEUS=1."""
    problem = missing(name)
    if problem is not None:
        if os.environ.get("REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"REQUIRE_PROMETHEUS=1 but {problem}")
        pytest.skip(problem)
    found = next(path for n in TOOLS[name] if (path := shutil.which(n)))
    return found


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the Grafana dashboard."""
    board = json.loads((ROOT / "monitoring" / "grafana" / "site-pipeline.json").read_text("utf-8"))
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]
