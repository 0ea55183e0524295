"""The exported metric families (name, help, labels, samples of a `Snapshot`), and a
snapshot in Prometheus's text format (`render`) and back (`read`, `read_file`: the state
file), or as a `prometheus_client` registry (`registry`, what is pushed).

`render` writes the text format by hand, not `prometheus_client.generate_latest`, which takes
several times longer for 2,000 sites; a test checks that `render` and `registry` say the
same. The families themselves are listed in `flows.metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from flows.metrics_values import RunValues, SiteValues, Snapshot

PREFIX = "site_pipeline_"


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
