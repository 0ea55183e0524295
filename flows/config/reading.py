"""Find the config file, read it and parse it into a checked `PipelineConfig`, once:
`read_config` gives a `LoadedConfig`; `ConfigFiles` reads each file of a command once.
Making the plan of a run from it is `flows.config.plan`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flows.config.errors import ConfigError
from flows.config.schema import ConfigFile, PipelineConfig

CONFIG_ENV = "SITE_PIPELINE_CONFIG"
DEFAULT_CONFIG = "config.yaml"


@dataclass(frozen=True)
class LoadedConfig:
    """A config file, read, parsed and checked: `config` is what `path` holds."""

    path: Path
    config: PipelineConfig


def find_config(config_path: str | os.PathLike[str] | None) -> Path:
    """`--config`, then `$SITE_PIPELINE_CONFIG`, then `./config.yaml`."""
    chosen = config_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    return Path(chosen).expanduser().absolute()


def read_config(config_path: str | os.PathLike[str] | None = None) -> LoadedConfig:
    """Find the config (`find_config`), read it and parse it. Raises `ConfigError`."""
    path = find_config(config_path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError([f"config = {str(path)!r}: cannot read it ({exc.strerror})"]) from None
    return LoadedConfig(path, parse_config(text, source=str(path)))


class ConfigFiles:
    """The config files one command reads, each read once: a second ask for the same file
    (the same once resolved) gets the first read's config, or its error again."""

    def __init__(self) -> None:
        self._read: dict[Path, LoadedConfig | ConfigError] = {}

    def read(self, config_path: str | os.PathLike[str] | None = None) -> LoadedConfig:
        """`read_config(config_path)`, read once per file; the path is the one asked for."""
        path = find_config(config_path)
        key = path.resolve()
        if key not in self._read:
            try:
                self._read[key] = read_config(path)
            except ConfigError as exc:
                self._read[key] = exc
        found = self._read[key]
        if isinstance(found, ConfigError):
            raise ConfigError(found.problems)
        return found if found.path == path else dataclasses.replace(found, path=path)


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


def validation_problems(exc: ValidationError, root: tuple[str, ...] = ()) -> list[str]:
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
        raise ConfigError([f"{source}: {line}" for line in validation_problems(exc)]) from None
