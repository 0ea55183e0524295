"""Whether Prefect's settings name an API URL, answered without importing Prefect where the
answer is certain: importing Prefect costs about a second, and `validate`, `--help` and a
usage error must not pay it.

Prefect 3 (read from 3.9) takes `PREFECT_API_URL` from, first to last: the environment, a
`.env` file in the working directory, `prefect.toml` or `pyproject.toml`'s `[tool.prefect]`
there, then the active profile of `profiles.toml` (`PREFECT_PROFILES_PATH`, else
`$PREFECT_HOME/profiles.toml`, else `~/.prefect/profiles.toml`; the active one is
`$PREFECT_PROFILE`, else the file's `active`, else "ephemeral"). Where one of those sources
could hold something this module does not read, the answer is None: ask Prefect. A test
(`tests/test_api_url.py`) checks each certain answer against Prefect's own.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

# Prefect's built-in profiles (prefect/settings/profiles.toml in 3.9): the one with no URL.
_NO_URL_PROFILES = frozenset({"ephemeral"})


def configured(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> bool | None:
    """True when an API URL is set, False when surely none is, None when only Prefect can
    tell (a source this reads only in part, or a profile Prefect defines)."""
    env = os.environ if environ is None else environ
    folder = Path.cwd() if cwd is None else cwd
    if "PREFECT_API_URL" in env:
        return bool(env["PREFECT_API_URL"]) or None
    if any(key.upper() == "PREFECT_API_URL" for key in env):
        return None  # another case: Prefect reads environment names case-insensitively
    if _mentions_prefect(folder / ".env", "PREFECT_") or (folder / "prefect.toml").exists():
        return None
    if _mentions_prefect(folder / "pyproject.toml", "tool.prefect"):
        return None
    return _profile_has_url(env)


def _mentions_prefect(path: Path, needle: str) -> bool:
    try:
        return needle.lower() in path.read_text(encoding="utf-8", errors="replace").lower()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # can't read it: Prefect may, or may fail; let it answer


def _profile_has_url(env: Mapping[str, str]) -> bool | None:
    home = env.get("PREFECT_HOME") or str(Path("~/.prefect").expanduser())
    path = Path(env.get("PREFECT_PROFILES_PATH") or Path(home) / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        profiles = {}
    except (OSError, ValueError):
        return None
    active = env.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    table = profiles.get("profiles", {})
    if not isinstance(table, dict) or not isinstance(active, str):
        return None
    settings = table.get(active)
    if settings is None:
        return False if active in _NO_URL_PROFILES else None
    if not isinstance(settings, dict):
        return None
    if active in {"local", "cloud", "test"}:
        return None  # Prefect's own profile (some with a URL), the user's changes on top
    if "PREFECT_API_URL" in settings:
        return bool(settings["PREFECT_API_URL"]) or None
    if any(str(key).upper() == "PREFECT_API_URL" for key in settings):
        return None
    return False
