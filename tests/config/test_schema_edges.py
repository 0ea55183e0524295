"""The config loader's edges, each message exactly: what mutation testing found unasserted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.config import (
    ConfigError,
    load_plan,
    parse_config,
    read_sites_file,
    site_dir_name,
    site_output_dir,
)
from tests.conftest import write_config


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return str(caught.value)


def test_a_config_error_is_its_lines_joined() -> None:
    """One line per problem, in order."""
    assert str(ConfigError(["a = 1: x", "b = 2: y"])) == "a = 1: x\nb = 2: y"


def test_yaml_syntax_errors_give_line_column_and_problem() -> None:
    """Where the YAML broke, 1-based, and what the parser said."""
    assert problems("pipeline:\n  sites: [a\n") == (
        "config.yaml: YAML syntax error at line 3, column 1: "
        "expected ',' or ']', but got '<stream end>'"
    )


def test_an_empty_mapping_misses_the_pipeline_key() -> None:
    assert problems("{}\n") == "config.yaml: pipeline: required key is missing"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("working_dir", '"w\\0"', "pipeline.working_dir = 'w\\x00': expected a path without"),
        ("sites_file", '"s\\0"', "pipeline.sites_file = 's\\x00': expected a path without"),
        (
            "default_flags",
            '["ok", "f\\0"]',
            "pipeline.default_flags[1] = 'f\\x00': expected no NUL",
        ),
        ("env", '{A: "v\\0"}', "pipeline.env.A = 'v\\x00': expected no NUL character"),
        ("env", '{"A\\0": v}', "pipeline.env.'A\\x00': expected a variable name"),
        ("env", '{"": v}', "pipeline.env.'': expected a variable name"),
    ],
)
def test_nul_and_bad_environment_names_are_named(key: str, value: str, expected: str) -> None:
    """Every string that reaches the OS is checked, each under its own key."""
    sites = "" if key == "sites_file" else "  sites: [a]\n"
    assert expected in problems(f"pipeline:\n{sites}  {key}: {value}\n")


def test_yaml_1_1_boolean_words_are_strings_as_keys_only() -> None:
    """on/off/yes/no as keys stay words, nested too; true and false as keys stay booleans
    (and are refused where a name is expected); as values they are booleans."""
    config = parse_config(
        "pipeline:\n  sites: [a]\n  use_async: off\n  env: {on: '1', yes: '2', OFF: '3'}\n"
    )
    assert config.env == {"on": "1", "yes": "2", "OFF": "3"} and config.use_async is False
    assert "pipeline.env.1.[key] = True: expected a valid string" in problems(
        "pipeline:\n  sites: [a]\n  env: {true: x}\n"
    )
    assert "pipeline.env.0.[key] = False: expected a valid string" in problems(
        "pipeline:\n  sites: [a]\n  env: {False: x}\n"
    )


def test_a_sites_file_keeps_what_is_before_the_first_hash(tmp_path: Path) -> None:
    """Comments start at the first '#'; blank lines go; UTF-8 is read as UTF-8; a missing
    file is named."""
    path = tmp_path / "sites.txt"
    path.write_text("a.com # note # more\n\n# whole line\ncafé.com\n", encoding="utf-8")
    assert read_sites_file(path) == ["a.com", "café.com"]
    with pytest.raises(ConfigError, match=r"sites_file = '.*nowhere.txt': cannot read it"):
        read_sites_file(tmp_path / "nowhere.txt")


@pytest.mark.parametrize("cap", [0, -1, True, "3", 2.5])
def test_a_bad_cap_override_is_refused(tmp_path: Path, cap: object) -> None:
    """--max-concurrent / max_concurrent_sites: a whole number > 0, not a bool."""
    with pytest.raises(ConfigError) as caught:
        load_plan(write_config(tmp_path, ["a"]), max_concurrent_sites=cap)  # type: ignore[arg-type]
    assert str(caught.value) == f"max_concurrent_sites = {cap!r}: expected a whole number > 0"


def test_overrides_win_and_absent_ones_keep_the_config(tmp_path: Path) -> None:
    """A cap of 1 and use_async False override the config; none keeps it; the plan names
    the config file it read."""
    config = write_config(tmp_path, ["a", "b"], max_concurrent_sites=4, use_async=True)
    plan = load_plan(config, max_concurrent_sites=1, use_async=False)
    assert (plan.max_concurrent_sites, plan.use_async) == (1, False)
    plan = load_plan(config)
    assert (plan.max_concurrent_sites, plan.use_async) == (4, True)
    assert plan.config_path == config and plan.sites == ("a", "b")


def test_site_overrides_are_a_list_and_errors_name_their_source(tmp_path: Path) -> None:
    """A string is not a site list; a bad site is named by where it came from: the sites
    argument, a sites file given now (read from the config's folder), or the config."""
    config = write_config(tmp_path, ["a"])
    with pytest.raises(ConfigError, match=r"^sites = 'abc': expected a list of site names$"):
        load_plan(config, sites="abc")
    with pytest.raises(ConfigError, match=r"^sites\[0\] = '-x'"):
        load_plan(config, sites=["-x"])
    (tmp_path / "extra.txt").write_text("b.com\n-y\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^sites_file 'extra.txt' entry\[1\] = '-y'"):
        load_plan(config, sites_file="extra.txt")
    (tmp_path / "good.txt").write_text("b.com\n", encoding="utf-8")
    assert load_plan(config, sites_file="good.txt").sites == ("b.com",)


@pytest.mark.parametrize(
    ("site", "name"),
    [
        ("a.com", "a.com"),
        ("x" * 100, "x" * 100),
        ("a/b", "a_b-"),
        (".hidden", "hidden-"),
        ("!!!", "___-"),
        ("PRN", "_PRN-"),
        ("con.txt.gz", "_con.txt.gz-"),
        ("lpt1", "_lpt1-"),
        ("COM10", "COM10"),
    ],
)
def test_folder_names(site: str, name: str) -> None:
    """Safe names are kept (up to 100 characters); others get '_' for each unsafe
    character, dots stripped at the ends, a '_' before a Windows device name (whatever
    follows its first dot), and an 8-hex hash of the real name."""
    got = site_dir_name(site)
    if name.endswith("-"):
        assert got.startswith(name) and len(got) == len(name) + 8
        assert all(c in "0123456789abcdef" for c in got[len(name) :])
    else:
        assert got == name
    long = site_dir_name("y" * 101)
    assert long.startswith("y" * 100 + "-") and len(long) == 109


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks here")
def test_a_symlink_planted_at_a_site_folder_is_refused(tmp_path: Path) -> None:
    """Someone made output/<site> a link elsewhere: the run refuses to write through it."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.com").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match=r"^site 'a.com': its output folder .* would leave"):
        site_output_dir(tmp_path / "out", "a.com")


@pytest.mark.parametrize(
    ("site", "expected"),
    [
        (3, "expected a string, got int"),
        ("", "expected a non-empty site name"),
        ("x" * 513, "expected at most 512 characters, got 513"),
        ("-rf", "must not start with '-' (it would be read as an option)"),
        (".", "must not contain '.' or '..' path segments"),
        ("..", "must not contain '.' or '..' path segments"),
        ("a/./b", "must not contain '.' or '..' path segments"),
        ("a\\..\\b", "must not contain '.' or '..' path segments"),
    ],
)
def test_each_bad_site_name_gets_its_exact_reason(site: object, expected: str) -> None:
    """The reason a site name is refused, word for word; 512 characters are still fine."""
    from flows.config import site_problem

    assert site_problem(site) == expected
    assert site_problem("x" * 512) is None and site_problem("a..b") is None


def test_errors_from_a_file_name_the_file_and_where_a_site_came_from(tmp_path: Path) -> None:
    """load_plan's messages start with the config file's path; a site from the config's
    sites_file is named as that file's entry; a YAML list is not a config."""
    config = write_config(tmp_path, ["a"], timeout=-1)
    with pytest.raises(ConfigError) as caught:
        load_plan(config)
    assert str(caught.value).startswith(f"{config}: pipeline.timeout = -1")
    (tmp_path / "list.txt").write_text("ok.com\n-bad\n", encoding="utf-8")
    config.write_text("pipeline:\n  sites_file: list.txt\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^pipeline.sites_file 'list.txt' entry\[1\] = '-bad'"):
        load_plan(config)
    assert problems("- a\n- b\n") == (
        "config.yaml: expected a mapping with a 'pipeline:' key, got list"
    )


def test_two_problems_of_one_check_are_two_exact_lines() -> None:
    """The consistency check's problems each get their own line, each under `pipeline.`."""
    assert problems(
        "pipeline:\n  sites: [a]\n  sites_file: s.txt\n  command: [python, x.py]\n"
    ).splitlines() == [
        "config.yaml: pipeline.command = ['python', 'x.py']: expected an element containing "
        "'{site}'",
        "config.yaml: pipeline.sites_file: expected either sites or sites_file, not both",
    ]


def test_a_duplicate_is_dropped_and_the_sites_after_it_are_kept(tmp_path: Path) -> None:
    """A repeated site is dropped with a warning that reaches the plan; the sites after it
    are still there, in order."""
    from flows.config import check_sites

    unique, warnings = check_sites(["a", "a", "b"])
    assert unique == ["a", "b"] and len(warnings) == 1 and "'a'" in warnings[0]
    plan = load_plan(write_config(tmp_path, ["a", "a", "b"]))
    assert plan.sites == ("a", "b")
    assert plan.warnings == ("pipeline.sites[1] = 'a': duplicate site dropped",)


def test_a_name_of_only_dots_gets_an_underscore_folder() -> None:
    """'...' is a valid site name (not a path segment '.' or '..'), but every character is
    stripped: the folder is '_' and the hash."""
    name = site_dir_name("...")
    assert name.startswith("_-") and len(name) == 10
