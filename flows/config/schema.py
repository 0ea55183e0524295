"""The schema of `config.yaml`: the `pipeline:` section (`PipelineConfig`), with the checks
that span its keys, and the file around it (`ConfigFile`). Its sections are
`flows.config.sections`; reading a file into it is `flows.config.reading`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from flows.config.argv import placeholder_problems
from flows.config.sections import (
    MAX_RETRY_COUNT,
    AsyncSettings,
    GroupConfig,
    HaltConfig,
    LearnedTimeout,
    MetricsConfig,
    NotifyConfig,
    ResultChecks,
    Strict,
    TaskRunnerConfig,
)

DEFAULT_NON_RETRYABLE_ERRORS: tuple[str, ...] = (
    r"^ModuleNotFoundError:",
    r"^ImportError:",
    r"^SyntaxError:",
    r"^IndentationError:",
)
"""Causes that no retry can fix: the pipeline's code or its installation is broken."""

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PipelineConfig(Strict):
    """The `pipeline:` section. Keys and meanings of the original executor, plus ours."""

    sites: list[Any] | None = None  # names, or SiteEntry mappings (checked by make_plan)
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
    local_server_idle: float = Field(default=600, ge=0)  # s; 0: none (stops with the run)
    task_runner: TaskRunnerConfig = Field(default_factory=TaskRunnerConfig)
    result_checks: ResultChecks | None = None
    learned_timeout: LearnedTimeout | None = None
    notify: list[NotifyConfig] = Field(default_factory=list)
    process_control: Literal["auto", "group", "tree"] = "auto"
    non_retryable_errors: list[str] = Field(default_factory=lambda: [*DEFAULT_NON_RETRYABLE_ERRORS])
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
            problems.extend(placeholder_problems(f"command[{index}]", part))
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


class ConfigFile(Strict):
    pipeline: PipelineConfig
