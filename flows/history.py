"""Earlier runs, read back from the Prefect API in bulk: what result checks compare against.

Each flow run's summary table artifact (`site-pipeline-summary`) has one row per site with
its status and, when result checks are on, the checked field and its value. One query reads
the last `runs` of those tables, never one query per site.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

SUMMARY_KEY = "site-pipeline-summary"
PAGE = 200  # the API's largest page


def check_values(
    field: str, sites: Sequence[str], window: int, runs: int = PAGE
) -> dict[str, list[float]]:
    """Each site's last `window` values of `field` (oldest first), from its successful
    attempts whose check passed, in the last `runs` flow runs. Sites with none are left out."""
    with get_client(sync_client=True) as client:
        tables = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY])),
            sort=ArtifactSort.CREATED_DESC,
            limit=min(runs, PAGE),
        )
    wanted = set(sites)
    newest_first: dict[str, list[float]] = {}
    for table in tables:
        rows: Any = json.loads(table.data) if isinstance(table.data, str) else table.data
        for row in rows if isinstance(rows, list) else []:
            site, value = row.get("site"), row.get("check_value")
            if (
                site in wanted
                and row.get("status") == "succeeded"
                and row.get("check_field") == field
                and row.get("check") == "ok"
                and isinstance(value, int | float)
                and not isinstance(value, bool)
                and len(newest_first.setdefault(site, [])) < window
            ):
                newest_first[site].append(float(value))
    return {site: values[::-1] for site, values in newest_first.items() if values}
