"""The API reads that `history`, `--retry-failed` and `doctor` share: the flow's runs and
their task runs, by the flow's name (`flows.names.FLOW_NAME`).
`PAGE`, the API's largest page, is defined once in `flows.engine.baselines`.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStartTime,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

from flows.engine.baselines import PAGE
from flows.names import FLOW_NAME


def of_the_flow() -> FlowFilter:
    """The filter for runs of the site-pipeline flow."""
    return FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))


def latest_runs(client: SyncPrefectClient, limit: int) -> list[FlowRun]:
    """The flow's last `limit` flow runs that started, newest first."""
    return client.read_flow_runs(
        flow_filter=of_the_flow(),
        flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
        sort=FlowRunSort.START_TIME_DESC,
        limit=limit,
    )


def task_runs(
    client: SyncPrefectClient, flow_run_ids: Iterable[UUID] | None, site: str | None, most: int
) -> list[TaskRun]:
    """Task runs of the site-pipeline flow (of those flow runs, of that site, when given),
    newest first, at most `most`."""
    of_runs = (
        FlowRunFilter(id=FlowRunFilterId(any_=list(flow_run_ids)))
        if flow_run_ids is not None
        else None
    )
    runs: list[TaskRun] = []
    while len(runs) < most:
        page = client.read_task_runs(
            flow_filter=of_the_flow(),
            flow_run_filter=of_runs,
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[site])) if site else None,
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=min(PAGE, most - len(runs)),
            offset=len(runs),
        )
        runs.extend(page)
        if len(page) < PAGE:
            break
    return runs
