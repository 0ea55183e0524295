"""The plan of a run (`RunPlan`): a config read once, with the overrides of the command or
the flow's parameters applied, every site's settings resolved (its entry's, else the
config's) with its cap group, and what the config asks of this machine checked."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.config.errors import ConfigError
from flows.config.reading import LoadedConfig, read_config
from flows.config.schema import PipelineConfig
from flows.config.sections import SiteEntry
from flows.config.sites import (
    check_sites,
    labelled,
    own_sites,
    site_entries,
    sites_as_given,
)
from flows.process import groups as procgroup


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
    configured_sites: frozenset[str] | None = None
    """The config's own site list, read with the config (the metrics drop a site that is no
    longer in it); None when it has none or it can't be read (then none is dropped)."""

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


def load_plan(
    config_path: str | os.PathLike[str] | None = None,
    *,
    sites: Sequence[object] | None = None,
    sites_file: str | os.PathLike[str] | None = None,
    max_concurrent_sites: int | None = None,
    use_async: bool | None = None,
) -> RunPlan:
    """Read the config and apply overrides, in one call: `make_plan(read_config(...))`.
    Raises `ConfigError` listing every problem."""
    return make_plan(
        read_config(config_path),
        sites=sites,
        sites_file=sites_file,
        max_concurrent_sites=max_concurrent_sites,
        use_async=use_async,
    )


def make_plan(
    loaded: LoadedConfig,
    *,
    sites: Sequence[object] | None = None,
    sites_file: str | os.PathLike[str] | None = None,
    max_concurrent_sites: int | None = None,
    use_async: bool | None = None,
) -> RunPlan:
    """The plan of a config read once (`read_config`), with the overrides applied. Raises
    `ConfigError` listing every problem."""
    path, config = loaded.path, loaded.config
    base = path.parent
    if max_concurrent_sites is not None and (
        isinstance(max_concurrent_sites, bool)
        or not isinstance(max_concurrent_sites, int)
        or max_concurrent_sites <= 0
    ):
        raise ConfigError(
            [f"max_concurrent_sites = {max_concurrent_sites!r}: expected a whole number > 0"]
        )
    raw_sites, source = sites_as_given(config, path, sites, sites_file)
    entries = site_entries(raw_sites, source)
    unique, warnings = check_sites([entry.site for entry, _ in entries], source)
    given = {entry.site: raw for (entry, raw) in entries if isinstance(raw, dict)}
    overridden = sites is not None or sites_file is not None
    own, configured = own_sites(config, path) if overridden else ({}, frozenset(unique))
    labels = {entry.site: label for entry, label in labelled(entries, source)}
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
        given=given if overridden else {},
        configured_sites=configured,
    )


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
