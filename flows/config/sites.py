"""The sites of a run: a site name's rules, the sites files (`.txt`, `.yaml`, `.json`), and
the entries of a site list (names, or mappings with settings of their own) with where
they came from (`pipeline.sites`, `sites_file`, or an override), for the messages."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flows.config.argv import placeholder_problems
from flows.config.errors import ConfigError
from flows.config.reading import validation_problems
from flows.config.schema import PipelineConfig
from flows.config.sections import SiteEntry

MAX_SITE_LENGTH = 512


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


def sites_as_given(
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


def site_entries(raw: Sequence[object], source: str) -> list[tuple[SiteEntry, object]]:
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
            problems.extend(validation_problems(exc, (label,)))
            continue
        problems.extend(_entry_problems(entry, label))
        entries.append((entry, item))
    if problems:
        raise ConfigError(problems)
    return entries


def labelled(
    entries: Sequence[tuple[SiteEntry, object]], source: str
) -> Iterator[tuple[SiteEntry, str]]:
    for index, (entry, _) in enumerate(entries):
        yield entry, f"{source}[{index}]"


def _entry_problems(entry: SiteEntry, label: str) -> list[str]:
    """A mapping entry's flags and env go to the OS, as `command` and `env` do."""
    problems = []
    for index, flag in enumerate(entry.flags):
        if "\0" in flag:
            problems.append(f"{label}.flags[{index}] = {flag!r}: expected no NUL character")
        problems.extend(placeholder_problems(f"{label}.flags[{index}]", flag))
    for name, value in entry.env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            problems.append(
                f"{label}.env.{name!r}: expected a variable name (not empty, without '=' or "
                "NUL) and a value without NUL"
            )
    return problems


def own_sites(
    config: PipelineConfig, path: Path
) -> tuple[dict[str, SiteEntry], frozenset[str] | None]:
    """The config's own site list, for a run given other sites (on the command line or as
    the flow's parameter): its mapping entries (`--site S` keeps S's settings) and its names
    (the metrics drop a site no longer in it). A sites file that can't be read gives no
    entries and no names (the override doesn't need it); a refused name, no names."""
    raw = _own_raw_sites(config, path)
    if raw is None:
        return {}, None
    entries = site_entries(*raw)
    try:
        names: frozenset[str] | None = frozenset(check_sites([e.site for e, _ in entries])[0])
    except ConfigError:
        names = None
    return {entry.site: entry for entry, item in entries if isinstance(item, dict)}, names


def _own_raw_sites(config: PipelineConfig, path: Path) -> tuple[list[Any], str] | None:
    """The config's own site list as written (`sites`, else the sites file's) and where it
    comes from, or None when it has none or the sites file can't be read."""
    if config.sites is not None:
        return list(config.sites), "pipeline.sites"
    if config.sites_file is None:
        return None
    try:
        raw = read_sites_file(path.parent / config.sites_file)
    except ConfigError:
        return None
    return raw, f"pipeline.sites_file {config.sites_file!r} entry"
