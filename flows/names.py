"""The names other programs see: the flow, its artifacts, its log records' keys. One
definition each (plain Python).

Changing one breaks `history`, `--retry-failed`, the learned timeouts and result checks
(they find earlier runs by these names), deployments and automations: treat them as a
contract, like the summary JSON.
"""

FLOW_NAME = "site-pipeline"
"""The flow's name: deployments are `site-pipeline/<name>`; `history` and `--retry-failed`
find earlier runs by it; `setup`'s automations match it."""

SUMMARY_KEY = "site-pipeline-summary"
"""The table artifact with one row per site (`flows.report.table_rows`); earlier runs' rows
are the baselines of result checks and learned timeouts (`flows.engine.baselines`)."""

FAILURES_KEY = "site-pipeline-failures"
"""The markdown artifact of failed sites, grouped (`flows.failure_causes.failures_markdown`)."""

HEALTH_KEY = "site-pipeline-health"
"""The markdown artifact of each site's health: its last outcomes, durations and records,
and its failure streak (`flows.health.health_markdown`), published every run."""

PROGRESS_KEY = "site-pipeline-progress"
"""The progress artifact: the share of sites done."""

# `extra` keys the task and the flow put on their log records, which the CLI's console reads
# (flows.cli.console): the lifecycle lines, the pipelines' own lines, the progress line.
SITE_EVENT = "site_event"  # started | succeeded | retrying | failed | timed_out
PIPELINE_OUTPUT = "pipeline_output"  # a line the pipeline printed
PROGRESS = "site_progress"  # the flow's "7/10 sites done" line: the live view shows it instead
