"""A run's Prometheus metrics (`pipeline.metrics`): every site's last values, and the run's.

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
(`pipeline.sites` or `pipeline.sites_file`, read at the run's end). Where that list can't be
read (the flow was given its sites and the config lists none), no site is removed.

The previous values are read from the state file: the textfile when one is set, else
`<output_dir>/metrics.prom`, in the same format. The file is written by `render` (fast: the
text format by hand, not `prometheus_client.generate_latest`, which takes several times
longer for 2,000 sites); `registry` gives the same families as a `prometheus_client`
registry for the Pushgateway, and a test checks that the two say the same.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError

from filelock import FileLock, Timeout
from prometheus_client import CollectorRegistry, push_to_gateway
from prometheus_client.core import GaugeMetricFamily, Metric

PREFIX = "site_pipeline_"
STATE_NAME = "metrics.prom"
"""The state file's name under `output_dir` when no textfile is set."""

SITE_STATUSES = ("succeeded", "failed", "timed_out", "cancelled")
RUN_STATUSES = ("succeeded", "failed", "timed_out", "cancelled", "skipped")
_FAILED = frozenset({"failed", "timed_out"})
MB = 2**20


@dataclass(frozen=True)
class SiteValues:
    """One site's exported values."""

    group: str
    last_run: float
    first_run: float
    status: str
    duration: float
    attempts: int
    streak: int
    last_success: float | None = None
    peak_rss_bytes: float | None = None
    cpu: float | None = None
    check: tuple[str, float] | None = None  # (field, value)


@dataclass(frozen=True)
class RunValues:
    """The last run's values."""

    sites: Mapping[str, int]  # by status, every RUN_STATUSES key
    end: float
    duration: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything exported: each site's values (in order) and the last run's."""

    sites: Mapping[str, SiteValues]
    run: RunValues


def ran(row: Mapping[str, Any]) -> bool:
    """Whether the summary row's site ran in its run (see the module's doc)."""
    status = row["status"]
    return status != "skipped" and not (status == "cancelled" and not row.get("attempts"))


def next_streak(previous: int, status: str) -> int:
    if status in _FAILED:
        return previous + 1
    return 0 if status == "succeeded" else previous


def _check_value(row: Mapping[str, Any]) -> tuple[str, float] | None:
    check = row.get("check")
    if not isinstance(check, Mapping):
        return None
    value = check.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return str(check.get("field")), float(value)


def build(
    summary: Mapping[str, Any],
    previous: Mapping[str, SiteValues],
    *,
    ended: float,
    duration: float | None = None,
    groups: Mapping[str, str] | None = None,
    configured: Collection[str] | None = None,
    streaks: Mapping[str, int] | None = None,
) -> Snapshot:
    """The snapshot after a run. `summary`: the run's (`flows.report.build_summary`);
    `previous`: the values read from the state file; `ended`: the run's end (Unix time);
    `groups`: each grouped site's group; `configured`: the config's own site list, None
    when unknown (no site is removed); `streaks`: failure streaks from the run history
    (this run included), where known: the larger of it and the previous value's is kept."""
    groups = groups or {}
    streaks = streaks or {}
    rows = summary["sites"]
    this_run = {row["site"]: row for row in rows if ran(row)}
    sites: dict[str, SiteValues] = {}
    for row in rows:
        site = row["site"]
        before = previous.get(site)
        if site not in this_run:
            if before is not None:
                sites[site] = before
            continue
        status = row["status"]
        streak = next_streak(before.streak if before else 0, status)
        if status != "cancelled":
            streak = max(streak, streaks.get(site, 0))
        rss = row.get("peak_rss_mb")
        cpu = row.get("cpu_s")
        sites[site] = SiteValues(
            group=groups.get(site, ""),
            last_run=ended,
            first_run=before.first_run if before else ended,
            status=status,
            duration=float(row.get("duration_s") or 0.0),
            attempts=int(row.get("attempts") or 0),
            streak=streak,
            last_success=ended if status == "succeeded" else _last_success(before),
            peak_rss_bytes=None if rss is None else round(float(rss) * MB),
            cpu=None if cpu is None else float(cpu),
            check=_check_value(row),
        )
    for site, values in previous.items():
        if site not in sites and (configured is None or site in configured):
            sites[site] = values
    tally = dict.fromkeys(RUN_STATUSES, 0)
    for row in rows:
        tally[row["status"]] = tally.get(row["status"], 0) + 1
    return Snapshot(sites, RunValues(tally, ended, duration))


def _last_success(before: SiteValues | None) -> float | None:
    return before.last_success if before is not None else None


# The families: (name, help, the labels after site and group, the samples of one site).
_SiteSamples = Callable[[SiteValues], Iterable[tuple[tuple[str, ...], float]]]


def _one(value: float | None) -> list[tuple[tuple[str, ...], float]]:
    return [] if value is None else [((), value)]


SITE_FAMILIES: tuple[tuple[str, str, tuple[str, ...], _SiteSamples], ...] = (
    (
        "site_last_run_timestamp_seconds",
        "When the last run that ran the site ended (Unix time).",
        (),
        lambda v: _one(v.last_run),
    ),
    (
        "site_first_run_timestamp_seconds",
        "When the first run these metrics saw the site in ended (Unix time).",
        (),
        lambda v: _one(v.first_run),
    ),
    (
        "site_last_success_timestamp_seconds",
        "When the last run the site succeeded in ended (Unix time); absent: never.",
        (),
        lambda v: _one(v.last_success),
    ),
    (
        "site_last_status",
        "1 for the site's status in the last run that ran it.",
        ("status",),
        lambda v: [((v.status,), 1.0)],
    ),
    (
        "site_last_duration_seconds",
        "The site's duration in the last run that ran it, retries included.",
        (),
        lambda v: _one(v.duration),
    ),
    (
        "site_last_attempts",
        "The attempts the site took in the last run that ran it.",
        (),
        lambda v: _one(v.attempts),
    ),
    (
        "site_last_peak_rss_bytes",
        "The largest RSS of the site's process tree over its attempts in its last run.",
        (),
        lambda v: _one(v.peak_rss_bytes),
    ),
    (
        "site_last_cpu_seconds",
        "The CPU time (user + system) of the site's process tree over its last run.",
        (),
        lambda v: _one(v.cpu),
    ),
    (
        "site_failure_streak",
        "The runs in a row the site did not succeed in (failed or timed out).",
        (),
        lambda v: _one(v.streak),
    ),
    (
        "site_last_check_value",
        "The result check's field value in the site's last run (result checks on).",
        ("field",),
        lambda v: [] if v.check is None else [((v.check[0],), v.check[1])],
    ),
)
RUN_FAMILIES: tuple[tuple[str, str], ...] = (
    ("run_sites", "The last run's sites by status."),
    ("run_duration_seconds", "How long the last run took, from its start to its end."),
    ("run_end_timestamp_seconds", "When the last run ended (Unix time)."),
)


def _run_samples(name: str, run: RunValues) -> list[tuple[tuple[str, ...], float]]:
    if name == "run_sites":
        return [((status,), float(count)) for status, count in run.sites.items()]
    if name == "run_duration_seconds":
        return _one(run.duration)
    return _one(run.end)


def families(snapshot: Snapshot) -> Iterator[tuple[str, str, tuple[str, ...], list[Any]]]:
    """Each family: (full name, help, label names, [(label values, value)])."""
    for name, text, extra, samples in SITE_FAMILIES:
        rows = [
            ((site, values.group, *labels), value)
            for site, values in snapshot.sites.items()
            for labels, value in samples(values)
        ]
        yield PREFIX + name, text, ("site", "group", *extra), rows
    for name, text in RUN_FAMILIES:
        labels = ("status",) if name == "run_sites" else ()
        yield PREFIX + name, text, labels, _run_samples(name, snapshot.run)


def _escape(value: str) -> str:
    if "\\" not in value and '"' not in value and "\n" not in value:
        return value
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value)  # an int as 3, a float as repr gives it: 1.5, 12.0, 1796620180.2690718


def render(snapshot: Snapshot) -> str:
    """The snapshot in Prometheus's text format (0.0.4), every family a gauge: the same
    families as `registry`, written by hand (the hot path: 2,000 sites in a few ms)."""
    heads = {
        site: f'site="{_escape(site)}",group="{_escape(values.group)}"'
        for site, values in snapshot.sites.items()
    }
    lines: list[str] = []
    for name, text, extra, samples in SITE_FAMILIES:
        full = PREFIX + name
        lines += (f"# HELP {full} {text}", f"# TYPE {full} gauge")
        for site, values in snapshot.sites.items():
            for more, value in samples(values):
                pairs = heads[site]
                if more:  # the status, the check's field
                    pairs += "".join(
                        f',{label}="{_escape(item)}"'
                        for label, item in zip(extra, more, strict=True)
                    )
                lines.append(f"{full}{{{pairs}}} {_number(value)}")
    for name, text in RUN_FAMILIES:
        full = PREFIX + name
        lines += (f"# HELP {full} {text}", f"# TYPE {full} gauge")
        for more, value in _run_samples(name, snapshot.run):
            status = f'{{status="{more[0]}"}}' if more else ""
            lines.append(f"{full}{status} {_number(value)}")
    return "\n".join(lines) + "\n"


class _Collector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for name, text, labels, rows in families(self.snapshot):
            family = GaugeMetricFamily(name, text, labels=list(labels))
            for values, value in rows:
                family.add_metric(list(values), value)
            yield family


def registry(snapshot: Snapshot) -> CollectorRegistry:
    """The snapshot as a `prometheus_client` registry (what is pushed)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(_Collector(snapshot))
    return found


_VALUE = r'"((?:[^"\\]|\\.)*)"'
_LINE = re.compile(
    rf"site_pipeline_(site_\w+)\{{site={_VALUE},group={_VALUE}(?:,(\w+)={_VALUE})?\}} (\S+)$"
)
_UNESCAPE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


_PLAIN = r'"([^"\\\n]*)"'
_PLAIN_LINE = re.compile(
    rf"^site_pipeline_(site_\w+)\{{site={_PLAIN},group={_PLAIN}(?:,\w+={_PLAIN})?\}} (\S+)$",
    re.M,
)


def read(text: str) -> dict[str, SiteValues]:
    """Each site's values from a file `render` wrote (other lines are passed over). Raises
    ValueError for a site whose values are incomplete. (The lines without an escaped
    character, nearly all, are found in one pass of a regular expression.)"""
    rows: list[tuple[str, str, str, str, str]] = _PLAIN_LINE.findall(text)
    if "\\" in text:  # a value with an escaped character: those lines one by one
        for line in text.splitlines():
            if "\\" in line and (match := _LINE.match(line)) is not None:
                name, site, group, _label, item, number = match.groups()
                site, group, item = _unescape(site), _unescape(group), _unescape(item or "")
                rows.append((name, site, group, item, number))
    seen: dict[str, dict[str, Any]] = {}
    for name, site, group, item, number in rows:
        values = seen.get(site)
        if values is None:
            values = seen[site] = {"group": group}
        if name == "site_last_status":
            values["status"] = item
        elif name == "site_last_check_value":
            values["check"] = (item, float(number))
        else:
            values[name] = float(number)
    return {site: _site_values(site, values) for site, values in seen.items()}


def _site_values(site: str, values: Mapping[str, Any]) -> SiteValues:
    try:
        return SiteValues(
            group=values["group"],
            last_run=values["site_last_run_timestamp_seconds"],
            first_run=values.get(
                "site_first_run_timestamp_seconds", values["site_last_run_timestamp_seconds"]
            ),
            status=values["status"],
            duration=values.get("site_last_duration_seconds", 0.0),
            attempts=int(values.get("site_last_attempts", 0)),
            streak=int(values.get("site_failure_streak", 0)),
            last_success=values.get("site_last_success_timestamp_seconds"),
            peak_rss_bytes=values.get("site_last_peak_rss_bytes"),
            cpu=values.get("site_last_cpu_seconds"),
            check=values.get("check"),
        )
    except KeyError as exc:
        raise ValueError(f"site {site!r}: no {exc.args[0]} value") from None


def read_file(path: Path) -> dict[str, SiteValues]:
    """`read` of the file at `path`; none when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return read(text)


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
