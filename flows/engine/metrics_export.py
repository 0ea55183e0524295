"""The run's end, for `pipeline.metrics`: export its metrics (`flows.metrics`) and log one
warning line per output that failed. The run's outcome never depends on it."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prefect.context import FlowRunContext

from flows.config import RunPlan
from flows.engine.prepare import RunLogger


def export_metrics(
    logger: RunLogger, plan: RunPlan, summary: Mapping[str, Any], streaks: Mapping[str, int]
) -> None:
    """Write and/or push the run's metrics when `pipeline.metrics` is set."""
    config = plan.config.metrics
    if config is None:
        return
    from flows import metrics  # prometheus_client: loaded only when metrics are on

    ended = time.time()
    context = FlowRunContext.get()
    duration = ended - context.start_time.timestamp() if context is not None else None
    textfile = plan.config_path.parent / config.textfile if config.textfile else None
    push = config.pushgateway
    outputs = metrics.Outputs(
        state=textfile or plan.output_dir / metrics.STATE_NAME,
        textfile=textfile,
        push_url=push.url if push else None,
        job=push.job if push else "site-pipeline",
        grouping=push.grouping if push else {},
        timeout=push.timeout if push else 10.0,
    )
    try:
        warnings = metrics.export(
            outputs,
            summary,
            ended=ended,
            duration=duration,
            groups=plan.site_groups,
            configured=plan.configured_sites,
            streaks=streaks,
        )
    except Exception as exc:  # a bug here must not change the run's outcome
        warnings = [f"metrics: not exported: {type(exc).__name__}: {exc}"]
    for line in warnings:
        logger.warning(line)
