"""Earlier runs, read back from the Prefect API in bulk: what result checks compare against,
the durations that learned timeouts come from, and each site's health (`flows.health`:
its last outcomes and its failure streak).

Each flow run's summary table artifact (`site-pipeline-summary`) has one row per site with
its status and, when result checks are on, the checked field and its value. One query reads
the last `runs` of those tables, never one query per site.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import Artifact
from prefect.client.schemas.sorting import ArtifactSort

from flows.names import SUMMARY_KEY

PAGE = 200  # the API's largest page


def summary_tables(
    runs: int = PAGE, client: SyncPrefectClient | None = None
) -> list[list[dict[str, Any]]]:
    """The rows of the last `runs` flow runs' summary tables, newest run first: one query
    (on `client` when given, else on a client of its own)."""
    if client is None:
        with get_client(sync_client=True) as own:
            return summary_tables(runs, own)
    tables = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY])),
        sort=ArtifactSort.CREATED_DESC,
        limit=min(runs, PAGE),
    )
    found = []
    for table in tables:
        rows = _rows(table)
        if rows is not None:
            found.append(rows)
    return found


def summary_tables_of(
    client: SyncPrefectClient, flow_run_ids: Collection[UUID]
) -> dict[UUID, list[dict[str, Any]]]:
    """The summary table rows of these flow runs, by flow run id: one query per 200 runs.
    A run that has not finished has no summary yet, and no entry."""
    wanted = list(dict.fromkeys(flow_run_ids))
    found: dict[UUID, list[dict[str, Any]]] = {}
    for start in range(0, len(wanted), PAGE):
        chunk = wanted[start : start + PAGE]
        tables = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[SUMMARY_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=chunk),
            ),
            sort=ArtifactSort.CREATED_DESC,
            limit=PAGE,  # one summary per flow run
        )
        for table in tables:
            rows = _rows(table)
            if rows is not None and table.flow_run_id is not None:
                found.setdefault(table.flow_run_id, rows)  # the newest, should there be two
    return found


def _rows(table: Artifact) -> list[dict[str, Any]] | None:
    """A table artifact's rows (its data is JSON text or a list), or None if not a table."""
    rows: Any = json.loads(table.data) if isinstance(table.data, str) else table.data
    if not isinstance(rows, list):
        return None
    return [row for row in rows if isinstance(row, dict)]


def check_values(
    field: str, sites: Sequence[str], window: int, tables: Sequence[Sequence[Row]]
) -> dict[str, list[float]]:
    """Each site's last `window` values of `field` (oldest first), from its successful
    attempts whose check passed, in `tables` (newest first). Sites with none are left out."""
    return _last_values(
        sites,
        window,
        tables,
        lambda row: (
            row.get("check_value")
            if row.get("check_field") == field and row.get("check") == "ok"
            else None
        ),
    )


def success_durations(
    sites: Sequence[str], window: int, tables: Sequence[Sequence[Row]]
) -> dict[str, list[float]]:
    """Each site's last `window` durations of successful attempts (oldest first).

    From the summary tables, not from task runs: a task run's run time adds up all its
    attempts (a retried site's would count the failed ones too), and 1,000 sites x 20 runs
    would be 100 pages of task runs against one page of tables."""
    return _last_values(sites, window, tables, lambda row: row.get("duration_s"))


Row = Mapping[str, Any]


def _last_values(
    sites: Sequence[str],
    window: int,
    tables: Sequence[Sequence[Row]],
    value_of: Callable[[Row], object],
) -> dict[str, list[float]]:
    wanted = set(sites)
    newest_first: dict[str, list[float]] = {}
    for rows in tables:
        for row in rows:
            site = row.get("site")
            if site not in wanted or row.get("status") != "succeeded":
                continue
            value = value_of(row)
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and len(newest_first.setdefault(str(site), [])) < window
            ):
                newest_first[str(site)].append(float(value))
    return {site: values[::-1] for site, values in newest_first.items() if values}
