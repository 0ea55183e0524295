"""What one attempt of a site gets: its argv, with the placeholders filled in, and its
output folder, a safe name inside `output_dir`."""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from flows.config.errors import ConfigError

PLACEHOLDERS = ("site", "python", "attempt", "output_dir")
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
MAX_DIR_NAME = 100  # a site's folder name, before its hash: far below every path limit


def placeholder_problems(key: str, part: str) -> list[str]:
    """`command[3] = '{nope}': unknown placeholder {nope}, expected one of ...` for each."""
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    return [
        f"{key} = {part!r}: unknown placeholder {{{name}}}, expected one of {known}"
        for name in PLACEHOLDER_RE.findall(part)
        if name not in PLACEHOLDERS
    ]


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


class CommandConfig(Protocol):
    """What `build_argv` reads of the config (`PipelineConfig` has both; the schema imports
    this module for `placeholder_problems`, so it is not imported back)."""

    @property
    def command(self) -> Sequence[str]: ...

    @property
    def default_flags(self) -> Sequence[str]: ...


def build_argv(
    config: CommandConfig,
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
        return PLACEHOLDER_RE.sub(lambda match: values[match.group(1)], part)

    return [fill(part) for part in [*config.command, *config.default_flags, *flags]]
