"""The flow's Prefect layer: what `flows.site_pipeline.run_sites` is made of.

- `prepare`: the plan, the limit claim, the job every task run gets (`SiteJob`);
- `progress`: the progress line, callback and artifact;
- `running`: `running_sites`, the slot pool, the task runner, the stop watcher and the
  emergency stop while the sites run; each site's report from its task run's state;
- `finish`: the artifacts and the flow run's final state;
- `task`: the `run_site` task, one attempt per task run attempt, and its retry options;
  `site_job`: `SiteJob`, what every task run needs; `attempt_engine`: one attempt, run
  under a slot and ended through its outcome's handler; `submission`: the task runs
  submitted, and yielded as each ends;
- `outcomes`: the pure retry decision; `failure`: `SiteAttemptFailed`; `states`: a task
  run's state as a site status; `logfilter`: no tracebacks for a site's failure;
- `task_runners`: where task runs run (threads in the flow's process, or Dask);
  `dask_runner`: the Dask runner that sends what task runs share once; `dask_worker`: what
  a local Dask worker loads as it starts (its preload, `flows.dask_cluster`);
- `baselines`: earlier runs' summaries, read in one query: what result checks compare
  against and what learned timeouts learn from.
"""

from flows.engine.failure import SiteAttemptFailed
from flows.engine.site_job import SiteJob
from flows.engine.task import configured_task, run_site

__all__ = ["SiteAttemptFailed", "SiteJob", "configured_task", "run_site"]
