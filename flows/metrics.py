"""A run's Prometheus metrics (`pipeline.metrics`): every site's last values, and the run's;
here their export after a run: read the previous values, write the state file, push.

Plain Python, no Prefect. After every run (interrupted and halted ones too) the run's
summary and the previous metrics make a `Snapshot`; it is written as a file for a textfile
collector (the node exporter's, `windows_exporter`'s) and/or pushed to a Pushgateway.

What is exported (base units, the `site_pipeline_` prefix; every per-site series has the
labels `site` and `group`, the latter empty, i.e. absent in PromQL, for a site without one):

- `site_pipeline_site_last_run_timestamp_seconds`: when the last run that ran the site ended;
- `site_pipeline_site_first_run_timestamp_seconds`: when the first run the metrics saw it in
  ended (what "no success for 36 h" counts from for a site that never succeeded);
- `site_pipeline_site_last_success_timestamp_seconds`: when the last run it succeeded in
  ended; absent until it has succeeded once;
- `site_pipeline_site_last_status{status}`: 1, one series per site, for its last status
  (`succeeded`, `failed`, `timed_out`, `cancelled`);
- `site_pipeline_site_last_duration_seconds`, `..._last_attempts`,
  `..._last_peak_rss_bytes`, `..._last_cpu_seconds`: its last run's figures (the latter two
  absent when unknown);
- `site_pipeline_site_failure_streak`: the runs in a row it did not succeed in
  (`flows.health`'s rule: `failed` and `timed_out` add one, `succeeded` ends it,
  `cancelled` passes over);
- `site_pipeline_site_last_check_value{field}`: the result check's field value, where checks
  are on and the value is a number;
- `site_pipeline_run_sites{status}`: the last run's sites by status (all five);
- `site_pipeline_run_duration_seconds`, `site_pipeline_run_end_timestamp_seconds`: the last
  run's length and end.

Labels stay bounded: `site` and `group` (the config's), `status` (five values), `field` (one,
the config's). No cause text and no flow run id is a label; the cause is not exported (its
text is unbounded): the summary JSON and the UI have it.

Which sites: a site is **in this run** when it ran: not `skipped` (`--retry-failed`), and not
`cancelled` before its first attempt (a stop or a halt came first). Those take this run's
values. Every other site keeps its previous values (a `--site` subset or a `--retry-failed`
run makes none vanish), unless it is **removed**: no longer in the config's own site list
(`pipeline.sites` or `pipeline.sites_file`, read with the config:
`RunPlan.configured_sites`). Where that list can't be
read (the flow was given its sites and the config lists none), no site is removed.

The previous values are read from the state file: the textfile when one is set, else
`<output_dir>/metrics.prom`, in the same format. Here: `export`, the state's lock, its atomic
write and the push to a Pushgateway. The snapshot's figures are built in
`flows.metrics_values`; the families, the text format (fast: by hand) and the registry that
is pushed are `flows.metrics_families`'.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

from filelock import FileLock, Timeout
from prometheus_client import push_to_gateway

from flows.metrics_families import read_file, registry, render
from flows.metrics_values import build

STATE_NAME = "metrics.prom"
"""The state file's name under `output_dir` when no textfile is set."""


def write_atomically(
    path: Path, text: str, retry_for: float = 2.0, replace_file: Callable[..., None] = os.replace
) -> None:
    """Write `text` to a temporary file beside `path`, then replace `path` with it: a reader
    sees the old file or the new one, never half of one. Windows refuses the replace while
    another process (the exporter) holds `path` open: it is tried again for `retry_for`
    seconds. The temporary file never ends in `.prom` (the collectors read only those)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        deadline = time.monotonic() + retry_for
        while True:
            try:
                replace_file(temporary, path)
                return
            except PermissionError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
    finally:
        temporary.unlink(missing_ok=True)


@dataclass(frozen=True)
class Outputs:
    """Where a snapshot goes (`pipeline.metrics`, resolved)."""

    state: Path  # read before, written after: the textfile, or <output_dir>/metrics.prom
    textfile: Path | None = None
    push_url: str | None = None
    job: str = "site-pipeline"
    grouping: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 10.0


LOCK_WAIT = 60.0
"""Seconds a run's end waits for another run of the same outputs to finish its export."""


def export(
    outputs: Outputs,
    summary: Mapping[str, Any],
    *,
    ended: float,
    duration: float | None = None,
    groups: Mapping[str, str] | None = None,
    configured: Collection[str] | None = None,
    streaks: Mapping[str, int] | None = None,
    lock_wait: float = LOCK_WAIT,
) -> list[str]:
    """Read the previous values, build the snapshot, write the state (the textfile) and push,
    holding the state's lock (`.<name>.lock` beside it), so two runs ending at once (a night
    and a `--site` run) each add their sites to the other's, not over them. Never raises for
    an output that fails: returns one warning line per failure (the run's outcome does not
    depend on its metrics)."""
    if outputs.textfile is None:  # the state under output_dir; a collector's folder exists
        with contextlib.suppress(OSError):  # the write says what is wrong
            outputs.state.parent.mkdir(parents=True, exist_ok=True)
    path = outputs.state.with_name(f".{outputs.state.name}.lock")
    try:
        path.touch()  # filelock would try again until lock_wait for a folder that isn't there
    except OSError:  # the folder is gone or can't be written: the write will say so
        return _export(outputs, summary, ended, duration, groups, configured, streaks)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=lock_wait)
    except Timeout:
        return [f"metrics: not exported: another run held {path} for {lock_wait:g} s"]
    try:
        return _export(outputs, summary, ended, duration, groups, configured, streaks)
    finally:
        lock.release()


def _export(
    outputs: Outputs,
    summary: Mapping[str, Any],
    ended: float,
    duration: float | None,
    groups: Mapping[str, str] | None,
    configured: Collection[str] | None,
    streaks: Mapping[str, int] | None,
) -> list[str]:
    warnings: list[str] = []
    try:
        previous = read_file(outputs.state)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        warnings.append(
            f"metrics: could not read the previous metrics {outputs.state} ({exc}); the sites "
            "not in this run are left out"
        )
        previous = {}
    snapshot = build(
        summary,
        previous,
        ended=ended,
        duration=duration,
        groups=groups,
        configured=configured,
        streaks=streaks,
    )
    try:
        write_atomically(outputs.state, render(snapshot))
    except OSError as exc:
        where = "textfile" if outputs.textfile else "state file"
        warnings.append(f"metrics: could not write the {where} {outputs.state}: {_reason(exc)}")
    if outputs.push_url:
        try:
            push_to_gateway(
                outputs.push_url,
                job=outputs.job,
                registry=registry(snapshot),
                grouping_key=dict(outputs.grouping),
                timeout=outputs.timeout,
            )
        except (OSError, HTTPException) as exc:  # refused, timed out, an answer not HTTP
            warnings.append(
                f"metrics: could not push to the Pushgateway {outputs.push_url}: {_reason(exc)}"
            )
    return warnings


def _reason(exc: OSError | HTTPException) -> str:
    if not isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"  # http.client's: BadStatusLine: garbage
    if isinstance(exc, HTTPError):
        return str(exc)  # HTTP Error 400: Bad Request
    if isinstance(exc, URLError):
        return str(exc.reason)  # the socket's error: [Errno 111] Connection refused
    return exc.strerror or str(exc)
