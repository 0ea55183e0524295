"""The house stays readable: the flow fits on one screen, and no function grows past 80 lines.

PrefectHQ/examples keep a flow to about 60 lines; `run_sites` composes named steps from
`flows/engine/`, and any function in `flows/` that grows past 80 lines should be split into
named steps, not left to grow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 80
MAX_FLOW_LINES = 60


def function_lengths() -> dict[str, int]:
    """`path:name` -> lines from `def` to the function's last line, for every function and
    method in flows/ (decorators not counted)."""
    lengths = {}
    for path in sorted((ROOT / "flows").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(ROOT)}:{node.name}"
                lengths[where] = max(lengths.get(where, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_no_function_in_flows_is_longer_than_80_lines() -> None:
    """Every function and method in flows/ is at most 80 lines long."""
    long = {name: n for name, n in function_lengths().items() if n > MAX_LINES}
    assert long == {}


def test_the_flow_function_fits_on_one_screen() -> None:
    """`run_sites`, the flow a Prefect engineer reads first, is at most 60 lines."""
    assert function_lengths()["flows/site_pipeline.py:run_sites"] <= MAX_FLOW_LINES


def test_the_measure_counts_a_long_function() -> None:
    """The measure itself sees the lines of a function's body (so the checks can fail)."""
    lengths = function_lengths()
    assert lengths["flows/backoff.py:retry_delay"] >= 10
