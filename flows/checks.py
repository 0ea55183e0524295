"""Result checks: a site that "succeeds" with no data, or far less than usual, is not a success.

Plain Python. The pipeline's JSON status line (`result`) holds a number, e.g. `records`
(dotted paths such as `stats.records` work). A result fails its check when:

- the field is missing, or is not a number;
- the value is below `min`;
- the site has at least `min_runs` earlier values on record, and the value is below
  `drop_factor x median` of the last `window` of them.

The earlier values come from the summary artifacts of earlier runs (`flows.engine.baselines`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flows.config import ResultChecks


@dataclass(frozen=True)
class Verdict:
    """One result's check: `value` is the field's number when it had one."""

    ok: bool
    value: float | None
    reason: str | None = None

    def to_json(self, field: str) -> dict[str, Any]:
        return {"field": field, "value": self.value, "ok": self.ok, "reason": self.reason}


def field_value(result: Mapping[str, Any] | None, path: str) -> float | str:
    """The number at dotted `path` in `result`, or why there is none."""
    if result is None:
        return "missing: the pipeline printed no JSON result"
    node: Any = result
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return "missing from the result"
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return f"= {node!r}: not a number"
    return float(node)


def _g(number: float) -> str:
    return f"{number:g}"


def check_result(
    result: Mapping[str, Any] | None, rules: ResultChecks, history: Sequence[float]
) -> Verdict:
    """Check `result` against `rules`, with `history` the site's earlier values, oldest first."""
    value = field_value(result, rules.field)
    if isinstance(value, str):
        return Verdict(False, None, f"{rules.field} {value}")
    if rules.min is not None and value < rules.min:
        return Verdict(False, value, f"{rules.field} = {_g(value)}, below min {_g(rules.min)}")
    recent = list(history)[-rules.window :]
    if rules.drop_factor is not None and len(recent) >= rules.min_runs:
        median = statistics.median(recent)
        if value < rules.drop_factor * median:
            return Verdict(
                False,
                value,
                f"{rules.field} = {_g(value)}, below {_g(rules.drop_factor)} x median "
                f"{_g(median)} over {len(recent)} runs",
            )
    return Verdict(True, value)
