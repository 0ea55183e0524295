"""The flow's Prefect layer: what `flows.site_pipeline.run_sites` is made of.

- `task`: the `run_site` task, one attempt per task run attempt, and its retry options;
- `task_runners`: where task runs run (threads in the flow's process, or Dask);
- `baselines`: earlier runs' summaries, read in one query: what result checks compare
  against and what learned timeouts learn from.
"""

from flows.engine.failure import SiteAttemptFailed
from flows.engine.task import SiteJob, configured_task, run_site

__all__ = ["SiteAttemptFailed", "SiteJob", "configured_task", "run_site"]
