"""The sections of `pipeline:` (pydantic models): async settings, the task runner, result
checks, learned timeouts, metrics, notify, halt, a site's own entry and a cap group. The
`pipeline:` section itself, which holds them, is `flows.config.schema`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_RETRY_COUNT = 50  # Prefect accepts at most 50 retry delays


class Strict(BaseModel):
    """A config section: unknown keys are refused, types are strict, values frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AsyncSettings(Strict):
    semaphore_limit: int | None = Field(default=None, gt=0)
    retry_backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    progress_reporting: bool = True
    error_aggregation: bool = True


class TaskRunnerConfig(Strict):
    """`pipeline.task_runner`: where the `run_site` task runs run."""

    kind: Literal["threads", "dask"] = "threads"
    address: str | None = Field(default=None, min_length=1)  # dask: tcp://scheduler:8786
    n_workers: int | None = Field(default=None, gt=0)  # local cluster: Dask's default if null
    threads_per_worker: int | None = Field(default=None, gt=0)  # local: enough for the cap
    worker_wait: float = Field(default=300, gt=0)  # dask: s to wait for a first worker

    @model_validator(mode="after")
    def _check_kind(self) -> TaskRunnerConfig:
        problems = []
        if "worker_wait" in self.model_fields_set and self.kind != "dask":
            problems.append(f"worker_wait = {self.worker_wait:g}: only for kind dask")
        for key in ("address", "n_workers", "threads_per_worker"):
            value = getattr(self, key)
            if value is not None and self.kind != "dask":
                problems.append(f"{key} = {value!r}: only for kind dask")
            elif value is not None and key != "address" and self.address is not None:
                problems.append(f"{key} = {value!r}: only for a local cluster (address: null)")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class ResultChecks(Strict):
    """`pipeline.result_checks`: a site that "succeeds" with no data, or far less than usual."""

    field: str = Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")  # dotted: stats.records
    min: float | None = None  # fewer than this fails the check
    drop_factor: float | None = Field(default=None, gt=0, le=1)  # below this x median fails
    window: int = Field(default=10, gt=0)  # the median is over this many earlier successes
    min_runs: int = Field(default=3, gt=0)  # fewer earlier successes: only `min` applies
    on_fail: Literal["fail", "warn"] = "fail"


class LearnedTimeout(Strict):
    """`pipeline.learned_timeout`: each site's timeout from its own recent successes
    (`flows.timeouts`); `pipeline.timeout` stays the hard cap."""

    factor: float = Field(default=3.0, gt=0)  # timeout = factor x p95 of recent durations
    min_runs: int = Field(default=5, gt=0)  # fewer successes on record: use `timeout`
    window: int = Field(default=20, gt=0, le=1000)  # the last N successful attempts
    floor: float = Field(default=60, ge=0)  # never below this many seconds

    @model_validator(mode="after")
    def _check_window(self) -> LearnedTimeout:
        if self.window < self.min_runs:
            raise ValueError(
                f"window = {self.window}: expected at least min_runs ({self.min_runs})"
            )
        return self


_LABEL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PushgatewayConfig(Strict):
    """`pipeline.metrics.pushgateway`: push every run's metrics to a Prometheus Pushgateway."""

    url: str  # http://host:9091
    job: str = Field(default="site-pipeline", min_length=1)
    grouping: dict[str, str] = Field(default_factory=dict)  # more grouping labels
    timeout: float = Field(default=10, gt=0)  # s for the push

    @model_validator(mode="after")
    def _check(self) -> PushgatewayConfig:
        from urllib.parse import urlsplit

        problems = []
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                f"url = {self.url!r}: expected an http:// or https:// URL with a host, "
                "e.g. http://localhost:9091"
            )
        for name, value in self.grouping.items():
            if not _LABEL_NAME_RE.match(name) or name == "job" or name.startswith("__"):
                problems.append(
                    f"grouping.{name!r}: expected a label name (letters, digits, '_'), not job"
                )
            elif not value:
                problems.append(f"grouping.{name} = '': expected a value that is not empty")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class MetricsConfig(Strict):
    """`pipeline.metrics`: every run's Prometheus metrics (`flows.metrics`), to a file for a
    textfile collector and/or a Pushgateway."""

    textfile: str | None = Field(default=None, min_length=1)  # <folder>/site_pipeline.prom
    pushgateway: PushgatewayConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> MetricsConfig:
        if self.textfile is None and self.pushgateway is None:
            raise ValueError("textfile: expected textfile, pushgateway or both to be set")
        if self.textfile is not None and (
            "\0" in self.textfile or not self.textfile.endswith(".prom")
        ):
            raise ValueError(
                f"textfile = {self.textfile!r}: expected a file name ending in .prom (the "
                "textfile collectors read only those), without a NUL character"
            )
        return self


NotifyOutcome = Literal["failed", "crashed", "completed", "cancelled"]
DEFAULT_NOTIFY_ON: tuple[NotifyOutcome, ...] = ("failed", "crashed")


class NotifyConfig(Strict):
    """One `pipeline.notify` entry: where `setup`'s automation sends which outcomes."""

    kind: Literal["discord", "slack", "webhook"]
    url_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable with the URL
    on: list[NotifyOutcome] = Field(default_factory=lambda: [*DEFAULT_NOTIFY_ON], min_length=1)


_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


class HaltConfig(Strict):
    """`pipeline.halt`: stop starting sites once too many have failed (GNU parallel's
    `--halt soon,fail=N` / `now,fail=N%`). `failed` is a count (3) or a share ("30%") of the
    sites done so far, judged once `min_done` sites are done; `when: soon` starts nothing
    new and lets running sites finish, `now` stops them too."""

    failed: int | None = Field(default=None, ge=1)
    failed_percent: float | None = Field(default=None, gt=0, le=100)
    min_done: int = Field(default=1, ge=1)
    when: Literal["soon", "now"] = "soon"

    @model_validator(mode="before")
    @classmethod
    def _read_percent(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "failed_percent" in data:
            return data
        failed = data.get("failed")
        if isinstance(failed, str):
            match = _PERCENT_RE.match(failed)
            if match is None:
                raise ValueError(
                    f"failed = {failed!r}: expected a count >= 1 or a percentage in (0, 100], "
                    'e.g. 3 or "30%"'
                )
            percent = float(match.group(1))
            if not 0 < percent <= 100:
                raise ValueError(f"failed = {failed!r}: expected a percentage in (0, 100]")
            data = {k: v for k, v in data.items() if k != "failed"}
            data["failed_percent"] = percent
        return data

    @model_validator(mode="after")
    def _check_rule(self) -> HaltConfig:
        if (self.failed is None) == (self.failed_percent is None):
            raise ValueError(
                "failed: required: expected a count >= 1 or a percentage in (0, 100], e.g. 3 "
                'or "30%"'
            )
        return self

    def describe(self) -> str:
        """`failed: 3` or `failed: 30% of at least 10 done`, for messages."""
        if self.failed is not None:
            return f"halt: {self.failed} failed"
        return f"halt: {self.failed_percent:g}% failed (of at least {self.min_done} done)"


class SiteEntry(Strict):
    """One `sites` entry written as a mapping: a site with settings of its own. Each one
    left out takes the config's value."""

    site: str
    timeout: float | None = Field(default=None, gt=0)
    retry_count: int | None = Field(default=None, ge=1, le=MAX_RETRY_COUNT)
    flags: list[str] = Field(default_factory=list)  # after default_flags, one argv element each
    env: dict[str, str] = Field(default_factory=dict)  # over the config's env
    group: str | None = None  # a `groups` entry; else the group whose `match` finds it
    priority: int = 0  # higher starts first, before the history order
    memory_limit: float | None = Field(default=None, gt=0)  # MB, the whole process tree


class GroupConfig(Strict):
    """One `pipeline.groups` entry: at most `max_concurrent` of its sites at once, across
    flow runs (a Prefect global concurrency limit of its own, `group_limit_name`)."""

    max_concurrent: int = Field(gt=0)
    match: str | None = Field(default=None, min_length=1)  # re.search on the site name
