"""Load and validate `config.yaml`, and turn it into a `RunPlan`.

Everything here is plain Python: no Prefect server is needed to test it.
A bad config raises `ConfigError` holding one line per problem; the CLI prints
those lines and exits with status 2 before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.process import groups as procgroup

CONFIG_ENV = "SITE_PIPELINE_CONFIG"
DEFAULT_CONFIG = "config.yaml"
PLACEHOLDERS = ("site", "python", "attempt", "output_dir")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
MAX_SITE_LENGTH = 512
MAX_RETRY_COUNT = 50  # Prefect accepts at most 50 retry delays
MAX_DIR_NAME = 100  # a site's folder name, before its hash: far below every path limit


class ConfigError(Exception):
    """The config, a site name or an argument is invalid. `problems` has one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AsyncSettings(_Strict):
    semaphore_limit: int | None = Field(default=None, gt=0)
    retry_backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    progress_reporting: bool = True
    error_aggregation: bool = True


class TaskRunnerConfig(_Strict):
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


class ResultChecks(_Strict):
    """`pipeline.result_checks`: a site that "succeeds" with no data, or far less than usual."""

    field: str = Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")  # dotted: stats.records
    min: float | None = None  # fewer than this fails the check
    drop_factor: float | None = Field(default=None, gt=0, le=1)  # below this x median fails
    window: int = Field(default=10, gt=0)  # the median is over this many earlier successes
    min_runs: int = Field(default=3, gt=0)  # fewer earlier successes: only `min` applies
    on_fail: Literal["fail", "warn"] = "fail"


class LearnedTimeout(_Strict):
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


class PushgatewayConfig(_Strict):
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


class MetricsConfig(_Strict):
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


class NotifyConfig(_Strict):
    """One `pipeline.notify` entry: where `setup`'s automation sends which outcomes."""

    kind: Literal["discord", "slack", "webhook"]
    url_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # the variable with the URL
    on: list[NotifyOutcome] = Field(default_factory=lambda: [*DEFAULT_NOTIFY_ON], min_length=1)


DEFAULT_NON_RETRYABLE_ERRORS: tuple[str, ...] = (
    r"^ModuleNotFoundError:",
    r"^ImportError:",
    r"^SyntaxError:",
    r"^IndentationError:",
)
"""Causes that no retry can fix: the pipeline's code or its installation is broken."""

_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


class HaltConfig(_Strict):
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
                'failed: required: expected a count >= 1 or a percentage in (0, 100], e.g. 3 '
                'or "30%"'
            )
        return self

    def describe(self) -> str:
        """`failed: 3` or `failed: 30% of at least 10 done`, for messages."""
        if self.failed is not None:
            return f"halt: {self.failed} failed"
        return f"halt: {self.failed_percent:g}% failed (of at least {self.min_done} done)"


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class SiteEntry(_Strict):
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


class GroupConfig(_Strict):
    """One `pipeline.groups` entry: at most `max_concurrent` of its sites at once, across
    flow runs (a Prefect global concurrency limit of its own, `group_limit_name`)."""

    max_concurrent: int = Field(gt=0)
    match: str | None = Field(default=None, min_length=1)  # re.search on the site name


@dataclass(frozen=True)
class SiteSettings:
    """A site's resolved settings: its entry's, else the config's."""

    timeout: float
    retry_count: int
    flags: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    group: str | None = None
    priority: int = 0
    memory_limit: float | None = None  # MB; None: no limit


def group_limit_name(tag: str, group: str) -> str:
    """The Prefect global concurrency limit of `group`: `<concurrency_tag>:<group>`."""
    return f"{tag}:{group}"


class PipelineConfig(_Strict):
    """The `pipeline:` section. Keys and meanings of the original executor, plus ours."""

    sites: list[Any] | None = None  # names, or SiteEntry mappings (checked by load_plan)
    sites_file: str | None = None
    command: list[str] = Field(
        default_factory=lambda: ["{python}", "-m", "universal_recon.main", "--site", "{site}"],
        min_length=1,
    )
    default_flags: list[str] = Field(default_factory=lambda: ["--schema-matrix", "--emit-status"])
    timeout: float = Field(default=3600, gt=0)
    retry_count: int = Field(default=3, ge=1, le=MAX_RETRY_COUNT)
    max_concurrent_sites: int = Field(default=5, gt=0)
    use_async: bool = True
    async_settings: AsyncSettings = Field(default_factory=AsyncSettings)
    retry_delay: float = Field(default=1, ge=0)
    retry_max_delay: float = Field(default=300, gt=0)
    retry_jitter: float = Field(default=0.2, ge=0)
    non_retryable_exit_codes: list[int] = Field(default_factory=lambda: [2])
    kill_grace_seconds: float = Field(default=10, gt=0)
    concurrency_tag: str = Field(default="site-pipeline", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    output_dir: str = Field(default="output", min_length=1)
    working_dir: str = Field(default=".", min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    max_log_lines: int = Field(default=200, gt=0)
    api_patience: float = Field(default=300, gt=0)
    slot_wait_notice: float = Field(default=60, gt=0)  # s a site waits before "who holds it"
    local_server_idle: float = Field(default=600, ge=0)  # s; 0: a temporary server per run
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig)
    result_checks: ResultChecks | None = None
    learned_timeout: LearnedTimeout | None = None
    notify: list[NotifyConfig] = Field(default_factory=list)
    process_control: Literal["auto", "group", "tree"] = "auto"
    non_retryable_errors: list[str] = Field(
        default_factory=lambda: [*DEFAULT_NON_RETRYABLE_ERRORS]
    )
    stall_timeout: float | None = Field(default=None, gt=0)
    memory_limit: float | None = Field(default=None, gt=0)  # MB, the whole process tree
    keep_logs: int = Field(default=14, ge=1)
    halt: HaltConfig | None = None
    order: Literal["longest_first", "listed"] = "longest_first"
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    metrics: MetricsConfig | None = None

    @model_validator(mode="after")
    def _check_consistency(self) -> PipelineConfig:
        problems: list[str] = []
        for index, pattern in enumerate(self.non_retryable_errors):
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(
                    f"non_retryable_errors[{index}] = {pattern!r}: expected a regular "
                    f"expression ({exc})"
                )
        if not any("{site}" in part for part in self.command):
            problems.append(
                f"command = {self.command!r}: expected an element containing '{{site}}'"
            )
        for index, part in enumerate([*self.command, *self.default_flags]):
            problems.extend(_placeholder_problems(f"command[{index}]", part))
        limit = self.async_settings.semaphore_limit
        if limit is not None and limit != self.max_concurrent_sites:
            problems.append(
                f"async_settings.semaphore_limit = {limit}: it is an alias of "
                f"max_concurrent_sites ({self.max_concurrent_sites}); expected the same value"
            )
        if self.sites is not None and self.sites_file is not None:
            problems.append("sites_file: expected either sites or sites_file, not both")
        problems.extend(self._os_string_problems())
        problems.extend(self._group_problems())
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _os_string_problems(self) -> list[str]:
        """Paths, argv and environment go to the OS, which refuses a NUL byte (and a '=' in
        an environment name): refused here, not as a traceback at run time."""
        problems = []
        paths = {"output_dir": self.output_dir, "working_dir": self.working_dir}
        if self.sites_file is not None:
            paths["sites_file"] = self.sites_file
        for key, value in paths.items():
            if "\0" in value:
                problems.append(f"{key} = {value!r}: expected a path without a NUL character")
        for key, parts in (("command", self.command), ("default_flags", self.default_flags)):
            for index, part in enumerate(parts):
                if "\0" in part:
                    problems.append(f"{key}[{index}] = {part!r}: expected no NUL character")
        for name, value in self.env.items():
            if not name or "=" in name or "\0" in name:
                problems.append(
                    f"env.{name!r}: expected a variable name: not empty, without '=' or NUL"
                )
            elif "\0" in value:
                problems.append(f"env.{name} = {value!r}: expected no NUL character")
        return problems


    def _group_problems(self) -> list[str]:
        problems = []
        for name, group in self.groups.items():
            if not re.match(_NAME_PATTERN, name):
                problems.append(
                    f"groups.{name!r}: expected a name of letters, digits, '_', '.' or '-'"
                )
            if group.max_concurrent > self.max_concurrent_sites:
                problems.append(
                    f"groups.{name}.max_concurrent = {group.max_concurrent}: expected at most "
                    f"the global cap, max_concurrent_sites ({self.max_concurrent_sites})"
                )
            if group.match is not None:
                try:
                    re.compile(group.match)
                except re.error as exc:
                    problems.append(
                        f"groups.{name}.match = {group.match!r}: expected a regular "
                        f"expression ({exc})"
                    )
        return problems

    def non_retryable_error_patterns(self) -> list[re.Pattern[str]]:
        """`non_retryable_errors`, compiled (each was checked when the config was read)."""
        return [re.compile(pattern) for pattern in self.non_retryable_errors]


class ConfigFile(_Strict):
    pipeline: PipelineConfig


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, with paths resolved against the config file's folder."""

    config: PipelineConfig
    config_path: Path
    sites: tuple[str, ...]
    output_dir: Path
    working_dir: Path
    max_concurrent_sites: int
    use_async: bool
    warnings: tuple[str, ...] = ()
    settings: Mapping[str, SiteSettings] = dataclasses.field(default_factory=dict)
    given: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """The mapping entries of the `sites` override (not the config's own), by site."""

    def site(self, name: str) -> SiteSettings:
        """`name`'s resolved settings (the config's, for a site without an entry)."""
        found = self.settings.get(name)
        if found is not None:
            return found
        return SiteSettings(
            self.config.timeout,
            self.config.retry_count,
            env=self.config.env,
            memory_limit=self.config.memory_limit,
        )

    def group_of(self, site: str) -> str | None:
        return self.site(site).group

    @property
    def site_groups(self) -> dict[str, str]:
        """Each grouped site of the plan: its group."""
        return {site: group for site in self.sites if (group := self.group_of(site))}

    @property
    def group_limits(self) -> dict[str, int]:
        """Each group's cap, never above the run's global cap."""
        return {
            name: min(group.max_concurrent, self.max_concurrent_sites)
            for name, group in self.config.groups.items()
        }

    def flow_sites(self) -> list[str | dict[str, Any]]:
        """The sites as the flow's `sites` parameter: names, and the override's mapping
        entries as they were given (the config's own entries the flow reads itself)."""
        return [dict(self.given[site]) if site in self.given else site for site in self.sites]

    @property
    def workers(self) -> int:
        """Threads for the task runner: one for sequential runs, else the cap.

        Sites that sleep between retries do not hold a slot, so a few extra threads
        let other sites use that slot meanwhile.
        """
        if not self.use_async:
            return 1
        return max(
            1, min(len(self.sites), self.max_concurrent_sites + min(16, self.max_concurrent_sites))
        )


def find_config(config_path: str | os.PathLike[str] | None) -> Path:
    """`--config`, then `$SITE_PIPELINE_CONFIG`, then `./config.yaml`."""
    chosen = config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    return Path(chosen).expanduser().absolute()


def _describe(error: dict[str, Any], root: tuple[str, ...]) -> str:
    loc = ".".join(str(part) for part in (*root, *error["loc"])) or "(top level)"
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required key is missing"
    if kind == "value_error":
        # Our own checks: each line already names its key and value.
        message = str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
        lines = [line for line in message.splitlines() if line]
        prefix = loc if loc != "(top level)" else ""
        return "\n".join(f"{prefix}.{line}" if prefix else line for line in lines)
    expected = error["msg"].replace("Input should be ", "expected ")
    return f"{loc} = {value!r}: {expected}"


def _validation_problems(exc: ValidationError, root: tuple[str, ...] = ()) -> list[str]:
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        problems.extend(_describe(dict(error), root).splitlines())
    return problems


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads a plain `on`, `off`, `yes` or `no` as a boolean, so the key `on:` of a
    `notify` entry would become `True:`. As a mapping key such a word stays a string; as a
    value it is still a boolean (`use_async: no`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for key_node, _ in node.value:
            if (
                isinstance(key_node, yaml.ScalarNode)
                and key_node.tag == "tag:yaml.org,2002:bool"
                and key_node.style is None
                and key_node.value.lower() not in ("true", "false")
            ):
                key_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep=deep)


def parse_config(text: str, source: str = DEFAULT_CONFIG) -> PipelineConfig:
    """Parse YAML text into a validated `PipelineConfig`, or raise `ConfigError`."""
    try:
        raw = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{source}: YAML syntax error{where}: {problem}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"{source}: expected a mapping with a 'pipeline:' key, got {type(raw).__name__}"]
        )
    try:
        return ConfigFile.model_validate(raw).pipeline
    except ValidationError as exc:
        raise ConfigError([f"{source}: {line}" for line in _validation_problems(exc)]) from None


def site_problem(site: object) -> str | None:
    """Why `site` is not a usable site name, or None when it is fine.

    Site names are opaque (a URL or a plugin name both work) but they become argv
    elements and a folder name, so they must not look like options, hold whitespace
    or control characters, or climb out of a folder.
    """
    if not isinstance(site, str):
        return f"expected a string, got {type(site).__name__}"
    if not site:
        return "expected a non-empty site name"
    if len(site) > MAX_SITE_LENGTH:
        return f"expected at most {MAX_SITE_LENGTH} characters, got {len(site)}"
    if site.startswith("-"):
        return "must not start with '-' (it would be read as an option)"
    for char in site:
        if char.isspace() or unicodedata.category(char).startswith("C"):
            return f"must not contain whitespace or control characters (found {char!r})"
    if site in {".", ".."} or any(part in {".", ".."} for part in re.split(r"[/\\]", site)):
        return "must not contain '.' or '..' path segments"
    return None


def check_sites(sites: Iterable[object], source: str = "sites") -> tuple[list[str], list[str]]:
    """Validate site names. Returns (unique sites in order, warnings); raises `ConfigError`."""
    problems: list[str] = []
    unique: list[str] = []
    seen: set[str] = set()
    warnings: list[str] = []
    for index, site in enumerate(sites):
        problem = site_problem(site)
        if problem:
            problems.append(f"{source}[{index}] = {site!r}: {problem}")
            continue
        assert isinstance(site, str)  # noqa: S101  (site_problem guarantees it; narrows for mypy)
        if site in seen:
            warnings.append(f"{source}[{index}] = {site!r}: duplicate site dropped")
            continue
        seen.add(site)
        unique.append(site)
    if problems:
        raise ConfigError(problems)
    if not unique:
        raise ConfigError([f"{source}: expected at least one site, got none"])
    return unique, warnings


def read_sites_file(path: Path) -> list[Any]:
    """A `.txt` file (or any other): one site per line; blank lines and '#' comments are
    ignored. A `.yaml`, `.yml` or `.json` file: a list of entries, names or mappings, as
    `pipeline.sites` takes them, or a mapping whose one key `sites` holds that list (the
    team's `{"sites": ["demo-bar-1.com", ...]}`)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(
            [f"sites_file = {str(path)!r}: cannot read it ({exc.strerror})"]
        ) from None
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return _structured_sites(path, text)
    sites: list[Any] = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            sites.append(entry)
    return sites


def _structured_sites(path: Path, text: str) -> list[Any]:
    """The list in a `.yaml` / `.json` sites file: the file's top level, or its `sites` key."""
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError([f"sites_file = {str(path)!r}: cannot parse it ({exc})"]) from None
    where = f"sites_file = {str(path)!r}"
    if isinstance(raw, dict):
        others = sorted(str(key) for key in raw if key != "sites")
        if "sites" not in raw:
            keys = ", ".join(repr(key) for key in others) or "none"
            raise ConfigError(
                [f"{where}: expected the key 'sites' (a list of sites), got keys {keys}"]
            )
        if others:
            raise ConfigError(
                [
                    f"{where}: unknown key(s) {', '.join(repr(k) for k in others)}: expected "
                    "only 'sites' (a list of sites)"
                ]
            )
        raw, where = raw["sites"], f"{where}: key 'sites'"
    if not isinstance(raw, list):
        raise ConfigError(
            [
                f"{where}: expected a list of sites (names or mappings), or a mapping with "
                f"a 'sites' list; got {type(raw).__name__}"
            ]
        )
    return raw


def load_plan(
    config_path: str | os.PathLike[str] | None = None,
    *,
    sites: Sequence[object] | None = None,
    sites_file: str | os.PathLike[str] | None = None,
    max_concurrent_sites: int | None = None,
    use_async: bool | None = None,
) -> RunPlan:
    """Read the config and apply overrides. Raises `ConfigError` listing every problem."""
    path = find_config(config_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError([f"config = {str(path)!r}: cannot read it ({exc.strerror})"]) from None
    config = parse_config(text, source=str(path))
    base = path.parent
    if max_concurrent_sites is not None and (
        isinstance(max_concurrent_sites, bool)
        or not isinstance(max_concurrent_sites, int)
        or max_concurrent_sites <= 0
    ):
        raise ConfigError(
            [f"max_concurrent_sites = {max_concurrent_sites!r}: expected a whole number > 0"]
        )
    raw_sites, source = _raw_sites(config, path, sites, sites_file)
    entries = _site_entries(raw_sites, source)
    unique, warnings = check_sites([entry.site for entry, _ in entries], source)
    given = {entry.site: raw for (entry, raw) in entries if isinstance(raw, dict)}
    own = _own_entries(config, path) if sites is not None or sites_file is not None else {}
    labels = {entry.site: label for entry, label in _labelled(entries, source)}
    listed = {entry.site: entry for entry, raw in entries if isinstance(raw, dict)}
    chosen = {**own, **listed}  # an override's own mapping wins; a bare name keeps the config's
    settings = resolve_settings(config, unique, chosen, labels)
    _check_platform(config, path)
    _check_metrics(config, path)
    working_dir = (base / config.working_dir).resolve()
    if not working_dir.is_dir():
        raise ConfigError(
            [f"{path}: pipeline.working_dir = {config.working_dir!r}: expected an existing folder"]
        )
    return RunPlan(
        config=config,
        config_path=path,
        sites=tuple(unique),
        output_dir=(base / config.output_dir).resolve(),
        working_dir=working_dir,
        max_concurrent_sites=max_concurrent_sites or config.max_concurrent_sites,
        use_async=config.use_async if use_async is None else use_async,
        warnings=tuple(warnings),
        settings=settings,
        given=given if sites is not None or sites_file is not None else {},
    )


def _site_entries(raw: Sequence[object], source: str) -> list[tuple[SiteEntry, object]]:
    """Each raw entry as a `SiteEntry` (a name becomes one without settings), with the raw
    entry. Raises `ConfigError` naming each bad mapping entry, `<source>[i].<key>`."""
    problems: list[str] = []
    entries: list[tuple[SiteEntry, object]] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            entries.append((SiteEntry.model_construct(site=item), item))  # checked by name
            continue
        label = f"{source}[{index}]"
        try:
            entry = SiteEntry.model_validate(item)
        except ValidationError as exc:
            problems.extend(_validation_problems(exc, (label,)))
            continue
        problems.extend(_entry_problems(entry, label))
        entries.append((entry, item))
    if problems:
        raise ConfigError(problems)
    return entries


def _labelled(
    entries: Sequence[tuple[SiteEntry, object]], source: str
) -> Iterator[tuple[SiteEntry, str]]:
    for index, (entry, _) in enumerate(entries):
        yield entry, f"{source}[{index}]"


def _placeholder_problems(key: str, part: str) -> list[str]:
    """`command[3] = '{nope}': unknown placeholder {nope}, expected one of ...` for each."""
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    return [
        f"{key} = {part!r}: unknown placeholder {{{name}}}, expected one of {known}"
        for name in _PLACEHOLDER_RE.findall(part)
        if name not in PLACEHOLDERS
    ]


def _entry_problems(entry: SiteEntry, label: str) -> list[str]:
    """A mapping entry's flags and env go to the OS, as `command` and `env` do."""
    problems = []
    for index, flag in enumerate(entry.flags):
        if "\0" in flag:
            problems.append(f"{label}.flags[{index}] = {flag!r}: expected no NUL character")
        problems.extend(_placeholder_problems(f"{label}.flags[{index}]", flag))
    for name, value in entry.env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            problems.append(
                f"{label}.env.{name!r}: expected a variable name (not empty, without '=' or "
                "NUL) and a value without NUL"
            )
    return problems


def _own_entries(config: PipelineConfig, path: Path) -> dict[str, SiteEntry]:
    """The config's own mapping entries, for sites given on the command line or as the
    flow's parameter: `--site S` keeps S's settings. A sites file that can't be read gives
    none (the override doesn't need it)."""
    if config.sites is not None:
        raw, source = list(config.sites), "pipeline.sites"
    elif config.sites_file is not None:
        source = f"pipeline.sites_file {config.sites_file!r} entry"
        try:
            raw = read_sites_file(path.parent / config.sites_file)
        except ConfigError:
            return {}
    else:
        return {}
    entries = _site_entries(raw, source)
    return {entry.site: entry for entry, item in entries if isinstance(item, dict)}


def resolve_settings(
    config: PipelineConfig,
    sites: Sequence[str],
    entries: Mapping[str, SiteEntry],
    labels: Mapping[str, str],
) -> dict[str, SiteSettings]:
    """Each site's settings: its mapping entry's, else the config's; its group by its own
    `group:`, else by the one `match` that finds it. Raises `ConfigError` naming the entry
    (`labels`: `pipeline.sites[3]`)."""
    problems: list[str] = []
    settings: dict[str, SiteSettings] = {}
    defaults = SiteSettings(
        config.timeout, config.retry_count, env=config.env, memory_limit=config.memory_limit
    )
    for site in sites:
        entry = entries.get(site)
        group, problem = _group_of(config, site, entry, labels.get(site, f"site {site!r}"))
        if problem:
            problems.append(problem)
        if entry is None:
            settings[site] = dataclasses.replace(defaults, group=group) if group else defaults
            continue
        settings[site] = SiteSettings(
            timeout=entry.timeout if entry.timeout is not None else config.timeout,
            retry_count=entry.retry_count if entry.retry_count is not None else config.retry_count,
            flags=tuple(entry.flags),
            env={**config.env, **entry.env} if entry.env else config.env,
            group=group,
            priority=entry.priority,
            memory_limit=(
                entry.memory_limit if entry.memory_limit is not None else config.memory_limit
            ),
        )
    if problems:
        raise ConfigError(problems)
    return settings


def _group_of(
    config: PipelineConfig, site: str, entry: SiteEntry | None, label: str
) -> tuple[str | None, str | None]:
    """(the site's group, a problem): its own `group:`, else the one group that matches."""
    names = ", ".join(config.groups) or "none are defined"
    if entry is not None and entry.group is not None:
        if entry.group not in config.groups:
            expected = f"expected a group of pipeline.groups ({names})"
            return None, f"{label}.group = {entry.group!r}: {expected}"
        return entry.group, None
    matching = [
        name
        for name, group in config.groups.items()
        if group.match is not None and re.search(group.match, site)
    ]
    if len(matching) > 1:
        both = " and ".join(repr(name) for name in matching)
        return None, (
            f"{label} = {site!r}: matched by groups {both}; expected one: give the entry its "
            "own group"
        )
    return (matching[0] if matching else None), None


def _raw_sites(
    config: PipelineConfig,
    path: Path,
    sites: Sequence[object] | None,
    sites_file: str | os.PathLike[str] | None,
) -> tuple[list[object], str]:
    """The sites as given, before they are checked, and where they came from (for errors):
    the `sites` override, the `sites_file` override, then the config's own."""
    base = path.parent
    if sites is not None:
        if isinstance(sites, str | bytes) or not isinstance(sites, Sequence):
            raise ConfigError([f"sites = {sites!r}: expected a list of site names"])
        return list(sites), "sites"
    if sites_file is not None:
        where = f"sites_file {str(sites_file)!r} entry"
        return list(read_sites_file(base / Path(sites_file))), where
    if config.sites is not None:
        return list(config.sites), "pipeline.sites"
    if config.sites_file is not None:
        return (
            list(read_sites_file(base / config.sites_file)),
            f"pipeline.sites_file {config.sites_file!r} entry",
        )
    raise ConfigError(
        [f"{path}: pipeline.sites: required: give pipeline.sites or pipeline.sites_file"]
    )


def _check_metrics(config: PipelineConfig, path: Path) -> None:
    """`pipeline.metrics.textfile` goes in a folder that exists (a collector's), not a
    folder itself."""
    if config.metrics is None or config.metrics.textfile is None:
        return
    target = path.parent / config.metrics.textfile
    if not target.parent.is_dir() or target.is_dir():
        raise ConfigError(
            [
                f"{path}: pipeline.metrics.textfile = {config.metrics.textfile!r}: expected a "
                f"file in an existing folder ({target.parent} is not one)"
                if not target.parent.is_dir()
                else f"{path}: pipeline.metrics.textfile = {config.metrics.textfile!r}: "
                "expected a file, not a folder"
            ]
        )


def _check_platform(config: PipelineConfig, path: Path) -> None:
    """What the config asks of this machine: process groups, prefect-dask."""
    if config.process_control == "group" and not procgroup.supported():
        raise ConfigError(
            [
                f"{path}: pipeline.process_control = 'group': {sys.platform!r} has no POSIX "
                "process groups; expected auto or tree"
            ]
        )
    if config.task_runner.kind == "dask" and importlib.util.find_spec("prefect_dask") is None:
        raise ConfigError(
            [
                f"{path}: pipeline.task_runner.kind = 'dask': prefect-dask is not installed; "
                'install the dask extra: pip install -e ".[dask]"'
            ]
        )


def site_dir_name(site: str) -> str:
    """A folder name for `site` that is safe on every filesystem (Windows too) and unique.

    Names made only of letters, digits, '.', '_' and '-', at most `MAX_DIR_NAME` long and
    not a Windows device name, are kept as they are. Otherwise every other character
    becomes '_', the name is cut to `MAX_DIR_NAME`, and a short hash of the real name is
    appended (so `\\`, `:` or `CON` never reach the filesystem as such).
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", site).strip(".") or "_"
    if safe == site and len(site) <= MAX_DIR_NAME and not _windows_reserved(site):
        return site
    digest = hashlib.sha256(site.encode("utf-8")).hexdigest()[:8]
    if _windows_reserved(safe):  # Windows reads the part before the first dot
        safe = f"_{safe}"
    return f"{safe[:MAX_DIR_NAME]}-{digest}"


def _windows_reserved(name: str) -> bool:
    """CON, PRN, AUX, NUL, COM1-9 and LPT1-9, with or without an extension: device names,
    not folders, on Windows."""
    stem = name.split(".", 1)[0].upper()
    return stem in {"CON", "PRN", "AUX", "NUL"} or bool(re.fullmatch(r"(COM|LPT)[1-9]", stem))


def site_output_dir(output_dir: Path, site: str) -> Path:
    """`output_dir/<safe name>`, guaranteed to be inside `output_dir`.

    The name has no separators and is neither '.' nor '..', so the join can't
    climb out; a symlink planted at that name is refused.
    """
    name = site_dir_name(site)
    target = output_dir / name
    if name in {".", ".."} or "/" in name or "\\" in name or target.is_symlink():
        raise ConfigError([f"site {site!r}: its output folder {target} would leave {output_dir}"])
    return target


def build_argv(
    config: PipelineConfig,
    site: str,
    attempt: int,
    output_dir: Path,
    flags: Sequence[str] = (),
) -> list[str]:
    """The pipeline's argv for one attempt: `command`, `default_flags`, then the site's own
    `flags`, one element each; placeholders are filled in one pass.

    A value is never re-scanned, so a site name holding '{attempt}' stays literal.
    """
    values = {
        "site": site,
        "python": sys.executable,
        "attempt": str(attempt),
        "output_dir": str(output_dir),
    }

    def fill(part: str) -> str:
        return _PLACEHOLDER_RE.sub(lambda match: values[match.group(1)], part)

    return [fill(part) for part in [*config.command, *config.default_flags, *flags]]
