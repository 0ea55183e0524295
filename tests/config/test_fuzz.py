"""Fuzzing with hypothesis: random YAML and random site names never make a traceback.

Whatever the input, the result is a clean `ConfigError` (exit status 2 from the CLI) or a
valid plan whose every site gets a usable output folder inside `output_dir` and an argv in
which the site name is never an option.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.cli import main
from flows.config import (
    ConfigError,
    build_argv,
    check_sites,
    load_plan,
    parse_config,
    site_dir_name,
    site_output_dir,
)

# The session's Prefect test server (other test files) runs background threads in this process
# that draw from the global `random` (retry jitter); Hypothesis notices the global state move
# while it generates and warns, as if a strategy had used it. Not ours: ignored here only.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the .random. module inside strategies")


@pytest.fixture(scope="module", autouse=True)
def no_prefect_api() -> Iterator[None]:
    """No API URL here, whatever this worker's earlier tests set (the session's test server):
    `validate` then reads no run history (`order: longest_first`, the default), so the 300
    documents cost the same whatever ran before. With the history of the worker's earlier
    runs read 300 times this test took up to 56 s in a full run, against about 4 s alone."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


KEYS = [
    "sites", "sites_file", "command", "default_flags", "timeout", "retry_count",
    "max_concurrent_sites", "use_async", "async_settings", "retry_delay", "retry_max_delay",
    "retry_jitter", "non_retryable_exit_codes", "kill_grace_seconds", "concurrency_tag",
    "output_dir", "working_dir", "env", "max_log_lines", "api_patience", "task_runner",
    "result_checks", "process_control",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
site_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=600
)
# URL-like names (long ones too), then anything.
plausible_sites = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:/?=&%~+\\-]{0,400}", fullmatch=True), site_names
)
plausible = {
    "sites": st.lists(st.one_of(site_names, values), max_size=6),
    "command": st.lists(
        st.sampled_from(["{python}", "-c", "pass", "--site", "{site}", "{attempt}", "{bogus}"]),
        max_size=6,
    ),
    "timeout": st.one_of(st.floats(), st.integers(), st.text(max_size=5)),
    "retry_count": st.integers(min_value=-5, max_value=50),
    "max_concurrent_sites": st.integers(min_value=-5, max_value=50),
    "output_dir": st.text(max_size=30),
    "concurrency_tag": st.text(max_size=30),
    "process_control": st.sampled_from(["auto", "group", "tree", "bogus"]),
    "task_runner": st.fixed_dictionaries({}, optional={"kind": st.sampled_from(["threads", "x"])}),
}
pipelines = st.fixed_dictionaries(
    {},
    optional={key: plausible.get(key, values) | values for key in KEYS},
).flatmap(
    lambda known: st.dictionaries(st.text(max_size=10), values, max_size=2).map(
        lambda extra: {**known, **extra}
    )
)
# Mostly valid: random site names and a few keys with valid values, so plans come out.
nearly_valid = st.fixed_dictionaries(
    {"sites": st.lists(plausible_sites, min_size=1, max_size=6)},
    optional={
        "output_dir": st.text(min_size=1, max_size=30),
        "max_concurrent_sites": st.integers(min_value=1, max_value=50),
        "timeout": st.floats(min_value=0.001, max_value=1e6),
        "retry_count": st.integers(min_value=1, max_value=10),
        "concurrency_tag": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True),
        "command": st.just(["{python}", "-m", "x", "--site", "{site}", "--out", "{output_dir}"]),
        "env": st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3),
    },
)
documents = st.one_of(
    nearly_valid.map(lambda p: yaml.safe_dump({"pipeline": p})),
    pipelines.map(lambda p: yaml.safe_dump({"pipeline": p})),
    values.map(yaml.safe_dump),
    st.text(max_size=200),
)


def check_usable(plan_sites: tuple[str, ...], command_ok: Any, folder: Path) -> None:
    """Every site: a folder inside `folder` that can be made, and an argv where the site
    is never an option."""
    names = set()
    for site in plan_sites:
        target = site_output_dir(folder, site)
        assert target.parent == folder
        assert len(target.name.encode("utf-8")) <= 255
        target.mkdir(parents=True, exist_ok=True)
        names.add(target.name)
        argv = build_argv(command_ok, site, 1, target)
        assert all(isinstance(part, str) for part in argv)
        assert site not in argv or not site.startswith("-")
    assert len(names) == len(set(plan_sites))  # one folder per site


@pytest.mark.slow  # 300 documents, each also through the CLI's `validate`
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents)
def test_random_yaml_is_a_clean_error_or_a_usable_plan(document: str) -> None:
    """Random YAML (structured near the real keys, or anything): load_plan raises only
    ConfigError; a plan it returns gives every site a folder and an argv; and the CLI's
    `validate` exits 0 or 2, never with a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "config.yaml"
        path.write_text(document, encoding="utf-8")
        try:
            plan = load_plan(path)
        except ConfigError as exc:
            assert str(exc).strip()
            expected = 2
        else:
            check_usable(plan.sites, plan.config, folder / "out")
            expected = 0
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(["validate", "--config", str(path)])
            except SystemExit as exit_:
                status = int(exit_.code or 0)
        assert status == expected, err.getvalue()
        if status == 2:
            assert err.getvalue().startswith("site-pipeline: error: ")


@settings(max_examples=500, deadline=None)
@given(sites=st.lists(plausible_sites, min_size=1, max_size=5))
def test_random_site_names_are_refused_clearly_or_run_safely(sites: list[str]) -> None:
    """A site name is refused with a message naming it, or it gets a folder inside the
    output folder that can be made (however long, whatever its characters) and an argv
    where it is a value, never an option."""
    config = parse_config(
        yaml.safe_dump({"pipeline": {"command": ["{python}", "x.py", "--site", "{site}"]}})
    )
    try:
        unique, _ = check_sites(sites)
    except ConfigError as exc:
        assert "sites" in str(exc)
        return
    with tempfile.TemporaryDirectory() as tmp:
        check_usable(tuple(unique), config, Path(tmp))
        for site in unique:
            argv = build_argv(config, site, 1, Path(tmp))
            assert argv[argv.index("--site") + 1] == site


@given(site=site_names)
def test_a_folder_name_is_stable_and_never_a_path(site: str) -> None:
    """The same site always maps to the same folder name, with no separator, never '.'
    or '..', and at most 255 bytes."""
    name = site_dir_name(site) if site else "_"
    assert name == (site_dir_name(site) if site else "_")
    assert "/" not in name and "\\" not in name and name not in {".", "..", ""}
    assert len(name.encode("utf-8")) <= 255
