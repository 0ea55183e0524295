"""site-pipeline: run a per-site pipeline over many sites with Prefect 3.

From Python: `run_pipeline(sites) -> dict[str, bool]` and its async and summary forms
(`flows.api`). The Prefect layer is `flows.site_pipeline` (the flow) and `flows.engine.task` (the
task; `flows.engine.attempt_engine` runs its attempts); config, backoff, process control, the
slot pool's rules and the report are plain Python that needs no server.
"""

from flows.api import (
    ConfigError,
    PipelineRunError,
    run_pipeline,
    run_pipeline_async,
    run_pipeline_summary,
    run_pipeline_summary_async,
)

__all__ = [
    "ConfigError",
    "PipelineRunError",
    "__version__",
    "run_pipeline",
    "run_pipeline_async",
    "run_pipeline_summary",
    "run_pipeline_summary_async",
]
__version__ = "0.1.0"
