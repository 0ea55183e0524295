"""Submission: one `run_site` task run per site, in the job's start order, each with its own
retries and its own share of the job, yielded to the flow as each ends (`sites_as_they_end`)."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from typing import Any, cast
from uuid import UUID

from prefect import Task
from prefect.client.schemas.objects import State
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner

from flows.engine.site_job import SiteJob
from flows.engine.task import configured_task
from flows.report import SiteReport


def _submitted(runner: TaskRunner[Any], job: SiteJob) -> Iterator[tuple[str, PrefectFuture[Any]]]:
    """One `run_site` task run per site, submitted in the job's start order (`job.plan.sites`),
    each with its own site's retries (one task per distinct `retry_count`) and its own share
    of the job (`SiteJob.for_site`)."""
    tasks: dict[int, Task[..., SiteReport | State[Any]]] = {}
    for site in job.plan.sites:
        count = job.plan.site(site).retry_count
        if count not in tasks:
            tasks[count] = configured_task(job.plan, count)
        # No upstream task runs: empty dependencies, as `runner.map` passes its own, so
        # Prefect doesn't walk the parameters for each one.
        parameters = {"site": site, "job": job.for_site(site)}
        yield site, runner.submit(cast(Any, tasks[count]), parameters, dependencies={})


def sites_as_they_end(
    runner: TaskRunner[Any], job: SiteJob, given_up: Callable[[], bool] = lambda: False
) -> Iterator[tuple[str, PrefectFuture[Any]]]:
    """Submit every site's task run (`_submitted`) and yield `(site, future)` as each ends,
    while the rest are still being submitted too. No future is held past its yield: a Dask
    scheduler keeps a task (its parameters, its result) while the flow holds its future, and
    a night's first sites end long before its last are submitted. Once `given_up()` says so
    (the run stopped a while ago), the sites not ended are yielded as they are, not done."""
    ended: queue.SimpleQueue[UUID] = queue.SimpleQueue()
    pending: dict[UUID, tuple[str, PrefectFuture[Any]]] = {}

    def on_end(future: PrefectFuture[Any]) -> None:
        ended.put(future.task_run_id)

    for site, future in _submitted(runner, job):
        pending[future.task_run_id] = (site, future)
        future.add_done_callback(on_end)
        del future  # `pending` holds it until it ends
        while True:
            try:
                done = ended.get_nowait()
            except queue.Empty:
                break
            yield pending.pop(done)
    while pending:
        try:
            yield pending.pop(ended.get(timeout=0.25))
        except queue.Empty:
            if given_up():  # the run stopped: what has not ended (a retry delay) is not waited for
                yield from list(pending.values())
                return
