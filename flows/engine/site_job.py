"""`SiteJob`: what every `run_site` task run of one flow run needs, whichever process runs it
(the plan, the flow run, each site's timeout and check history), and each site's share of it.

Plain Python: no Prefect here, so a Dask worker unpickles it with what it already has.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from uuid import UUID

from flows.config import RunPlan
from flows.process.attempt import AttemptOutcome
from flows.report import attempt_usage
from flows.timeouts import SiteTimeout, site_timeout


class SiteJob:
    """What every `run_site` task run of one flow run needs, whichever process runs it.

    A plain class on purpose: Prefect walks the dataclasses and models in a task's
    parameters once per task run. The flow's job holds the whole plan; each task run gets
    `for_site`, its own site's share, so what a task run carries does not grow with the
    site list: a Dask scheduler keeps every submitted task's parameters, unpickled, until
    the flow lets go of its future (with the whole plan in each, 500 sites cost the flow's
    process 0.45 MB a site, growing as the square of the site count).
    """

    __slots__ = ("check_history", "flow_run_id", "plan", "tags", "timeouts", "usage")

    def __init__(
        self,
        plan: RunPlan,
        flow_run_id: UUID,
        tags: tuple[str, ...],
        check_history: dict[str, list[float]] | None = None,
        timeouts: dict[str, SiteTimeout] | None = None,
    ) -> None:
        self.plan = plan
        self.flow_run_id = flow_run_id
        self.tags = tags  # the task runs' tags, for the tag-limit check shortcut
        self.check_history = check_history or {}  # result checks: earlier values per site
        self.timeouts = timeouts or {}  # each site's attempt timeout (flows.timeouts)
        self.usage: dict[str, list[dict[str, Any]]] = {}  # site -> its attempts' usage

    def for_site(self, site: str) -> SiteJob:
        """The job as `site`'s task run needs it: the plan with only `site` (its own entry,
        if any; the config without its site list, and not the config's site list that the
        flow's metrics keep), its timeout and its check history."""
        plan = self.plan
        config = plan.config.model_copy(update={"sites": None, "sites_file": None})
        own = replace(
            plan,
            config=config,
            sites=(site,),
            settings={site: plan.settings[site]} if site in plan.settings else {},
            given={site: plan.given[site]} if site in plan.given else {},
            configured_sites=None,
        )
        history = {site: self.check_history[site]} if site in self.check_history else None
        timeouts = {site: self.timeouts[site]} if site in self.timeouts else None
        return SiteJob(own, self.flow_run_id, self.tags, history, timeouts)

    def timeout(self, site: str) -> SiteTimeout:
        return self.timeouts.get(site) or site_timeout((), None, self.plan.site(site).timeout)

    def record_usage(
        self, site: str, attempt: int, outcome: AttemptOutcome
    ) -> list[dict[str, Any]]:
        """`site`'s attempts' usage (peak RSS, CPU seconds) in attempt order, this one last.
        Prefect runs a task run's retries in the same call, with the same parameters, so the
        job that ran attempt 1 of a site also runs its attempt 2, in whichever process."""
        kept = [entry for entry in self.usage.get(site, []) if entry["attempt"] < attempt]
        kept.append(attempt_usage(attempt, outcome.peak_rss_mb, outcome.cpu_s))
        self.usage[site] = kept
        return kept
