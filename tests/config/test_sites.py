"""Per-site settings and groups in the config (issue 21), without a Prefect server: each
entry resolves to its own settings, and every bad entry is an exit 2 that names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.cli import main
from flows.config import ConfigError, build_argv, group_limit_name, load_plan

BASE: dict[str, Any] = {
    "command": ["{python}", "pipe.py", "--site", "{site}"],
    "default_flags": ["--emit-status"],
    "max_concurrent_sites": 4,
    "timeout": 600,
    "retry_count": 3,
    "env": {"SHARED": "config", "BOTH": "config"},
}


def write(folder: Path, **pipeline: Any) -> Path:
    path = folder / "config.yaml"
    text = yaml.safe_dump({"pipeline": {**BASE, **pipeline}}, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def problems(folder: Path, **pipeline: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_plan(write(folder, **pipeline))
    return caught.value.problems


def test_a_mapping_entry_has_its_own_settings_and_the_rest_take_the_configs(
    tmp_path: Path,
) -> None:
    """timeout, retry_count, flags, env, group and priority come from the entry; a plain
    name, and every key an entry leaves out, takes the config's value."""
    plan = load_plan(
        write(
            tmp_path,
            sites=[
                "plain.com",
                {
                    "site": "slow.com",
                    "timeout": 7200,
                    "retry_count": 1,
                    "flags": ["--depth", "3 levels"],
                    "env": {"BOTH": "site", "OWN": "1"},
                    "priority": 5,
                },
                {"site": "half.com", "timeout": 30},
            ],
        )
    )
    assert plan.sites == ("plain.com", "slow.com", "half.com")
    slow, plain, half = plan.site("slow.com"), plan.site("plain.com"), plan.site("half.com")
    assert (slow.timeout, slow.retry_count, slow.flags, slow.priority) == (
        7200,
        1,
        ("--depth", "3 levels"),
        5,
    )
    assert slow.env == {"SHARED": "config", "BOTH": "site", "OWN": "1"}  # merged over env
    assert (plain.timeout, plain.retry_count, plain.flags, plain.priority) == (600, 3, (), 0)
    assert plain.env == BASE["env"]
    assert (half.timeout, half.retry_count) == (30, 3)


def test_site_flags_come_after_default_flags_as_separate_elements(tmp_path: Path) -> None:
    """A site's flags are appended after default_flags, one argv element each, with the
    placeholders filled and nothing read by a shell."""
    plan = load_plan(
        write(tmp_path, sites=[{"site": "a.com", "flags": ["--out", "{output_dir}/x; rm -rf /"]}])
    )
    argv = build_argv(plan.config, "a.com", 2, tmp_path, plan.site("a.com").flags)
    assert argv[1:] == [
        "pipe.py",
        "--site",
        "a.com",
        "--emit-status",
        "--out",
        f"{tmp_path}/x; rm -rf /",
    ]


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".JSON", ".json"])
def test_a_structured_sites_file_holds_the_same_entries(tmp_path: Path, suffix: str) -> None:
    """sites_file may be a .yaml (or .yml) or .json list of names and mappings, the suffix in
    any case; .txt stays one name a line."""
    entries = ["a.com", {"site": "b.com", "timeout": 99}]
    text = json.dumps(entries) if suffix.lower() == ".json" else yaml.safe_dump(entries)
    (tmp_path / f"sites{suffix}").write_text(text, encoding="utf-8")
    plan = load_plan(write(tmp_path, sites_file=f"sites{suffix}"))
    assert plan.sites == ("a.com", "b.com") and plan.site("b.com").timeout == 99
    (tmp_path / "names.txt").write_text("{site: c.com}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.com"):  # a .txt line is a name, not YAML
        load_plan(write(tmp_path, sites_file="names.txt"))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_sites_file_mapping_with_a_sites_list_is_read_as_that_list(
    tmp_path: Path, suffix: str
) -> None:
    """The team's own file, `{"sites": [...]}` (JSON or YAML), is read as its list, names
    and mappings alike, in order."""
    body = {"sites": ["demo-bar-1.com", {"site": "demo-bar-2.com", "timeout": 7}, "c.com"]}
    text = json.dumps(body) if suffix == ".json" else yaml.safe_dump(body)
    (tmp_path / f"sites{suffix}").write_text(text, encoding="utf-8")
    plan = load_plan(write(tmp_path, sites_file=f"sites{suffix}"))
    assert plan.sites == ("demo-bar-1.com", "demo-bar-2.com", "c.com")
    assert plan.site("demo-bar-2.com").timeout == 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hosts: [a]\n", "expected the key 'sites' (a list of sites), got keys 'hosts'"),
        ("{}\n", "expected the key 'sites' (a list of sites), got keys none"),
        (
            "sites: [a]\nversion: 2\n",
            "unknown key(s) 'version': expected only 'sites' (a list of sites)",
        ),
        (
            "sites: a.com\n",
            "key 'sites': expected a list of sites (names or mappings), or a mapping with a "
            "'sites' list; got str",
        ),
        (
            "a.com\n",
            "expected a list of sites (names or mappings), or a mapping with a 'sites' list; "
            "got str",
        ),
    ],
)
def test_a_structured_sites_file_of_another_shape_names_what_it_expected(
    tmp_path: Path, text: str, expected: str
) -> None:
    """Any other mapping, a `sites` that is not a list, or a bare value: one problem that
    names the file and the key it expected."""
    (tmp_path / "sites.yaml").write_text(text, encoding="utf-8")
    found = problems(tmp_path, sites_file="sites.yaml")
    assert found == [f"sites_file = {str(tmp_path / 'sites.yaml')!r}: {expected}"]


def test_a_site_given_on_the_command_line_keeps_its_config_settings(tmp_path: Path) -> None:
    """`--site S` (the `sites` override) for a site with settings in the config keeps them;
    an override's own mapping wins, and is what the flow is given."""
    config = write(tmp_path, sites=["a.com", {"site": "b.com", "timeout": 9, "priority": 2}])
    plan = load_plan(config, sites=["b.com", {"site": "c.com", "flags": ["-v"]}])
    assert plan.sites == ("b.com", "c.com")
    assert (plan.site("b.com").timeout, plan.site("b.com").priority) == (9, 2)
    assert plan.site("c.com").flags == ("-v",)
    assert plan.flow_sites() == ["b.com", {"site": "c.com", "flags": ["-v"]}]
    override = load_plan(config, sites=[{"site": "b.com", "timeout": 5}])
    assert override.site("b.com").timeout == 5


def test_the_plan_carries_the_config_s_own_sites_whatever_the_run_was_given(
    tmp_path: Path,
) -> None:
    """`RunPlan.configured_sites` (what the metrics keep) is the config's own list, read with
    the config: the run's sites when not overridden; the config's, not the override's, when
    they are; None when the config's sites file can't be read or has no sites key."""
    config = write(tmp_path, sites=["a.com", {"site": "b.com", "timeout": 9}])
    assert load_plan(config).configured_sites == {"a.com", "b.com"}
    assert load_plan(config, sites=["c.com"]).configured_sites == {"a.com", "b.com"}
    (tmp_path / "sites.txt").write_text("d.com\ne.com\n", encoding="utf-8")
    from_file = write(tmp_path, sites_file="sites.txt")
    assert load_plan(from_file, sites=["a.com"]).configured_sites == {"d.com", "e.com"}
    (tmp_path / "sites.txt").unlink()
    assert load_plan(from_file, sites=["a.com"]).configured_sites is None


def test_a_site_joins_a_group_by_its_own_group_or_by_a_match(tmp_path: Path) -> None:
    """`group:` decides; else the one group whose `match` finds the name; else none. Each
    group's limit is named after the tag and the group."""
    plan = load_plan(
        write(
            tmp_path,
            concurrency_tag="nightly",
            sites=[
                "one.vendor.com",
                "two.vendor.com",
                "other.org",
                {"site": "three.elsewhere.net", "group": "vendor"},
            ],
            groups={"vendor": {"max_concurrent": 1, "match": r"\.vendor\.com$"}},
        )
    )
    assert [plan.group_of(s) for s in plan.sites] == ["vendor", "vendor", None, "vendor"]
    assert plan.group_limits == {"vendor": 1}
    assert group_limit_name("nightly", "vendor") == "nightly:vendor"


def test_two_matching_groups_are_an_error_unless_the_entry_decides(tmp_path: Path) -> None:
    """A site that two groups match is an error naming both; its own `group:` settles it."""
    groups = {
        "host": {"max_concurrent": 1, "match": r"\.vendor\.com$"},
        "dotcom": {"max_concurrent": 2, "match": r"\.com$"},
    }
    found = problems(tmp_path, sites=["a.vendor.com"], groups=groups)
    assert found == [
        "pipeline.sites[0] = 'a.vendor.com': matched by groups 'host' and 'dotcom'; "
        "expected one: give the entry its own group"
    ]
    plan = load_plan(
        write(tmp_path, sites=[{"site": "a.vendor.com", "group": "dotcom"}], groups=groups)
    )
    assert plan.group_of("a.vendor.com") == "dotcom"


BAD_ENTRIES = [
    ("no site", [{"timeout": 5}], None, "pipeline.sites[0].site: required key is missing"),
    (
        "unknown key",
        ["a", {"site": "b", "retries": 2}],
        None,
        "pipeline.sites[1].retries: unknown key",
    ),
    (
        "negative timeout",
        ["a", "b", "c", {"site": "d", "timeout": -1}],
        None,
        "pipeline.sites[3].timeout = -1: expected greater than 0",
    ),
    (
        "priority not an integer",
        [{"site": "a", "priority": "high"}],
        None,
        "pipeline.sites[0].priority = 'high': expected a valid integer",
    ),
    (
        "priority a float",
        [{"site": "a", "priority": 1.5}],
        None,
        "pipeline.sites[0].priority = 1.5: expected a valid integer",
    ),
    (
        "undefined group",
        [{"site": "a", "group": "nope"}],
        {"real": {"max_concurrent": 1}},
        "pipeline.sites[0].group = 'nope': expected a group of pipeline.groups (real)",
    ),
    (
        "bad site name in a mapping",
        [{"site": "-rf"}],
        None,
        "pipeline.sites[0] = '-rf': must not start with '-'",
    ),
    (
        "invalid match",
        ["a"],
        {"g": {"max_concurrent": 1, "match": "(oops"}},
        "pipeline.groups.g.match = '(oops': expected a regular expression",
    ),
    (
        "group cap zero",
        ["a"],
        {"g": {"max_concurrent": 0}},
        "pipeline.groups.g.max_concurrent = 0: expected greater than 0",
    ),
    (
        "group cap above the global cap",
        ["a"],
        {"g": {"max_concurrent": 5}},
        "pipeline.groups.g.max_concurrent = 5: expected at most the global cap, "
        "max_concurrent_sites (4)",
    ),
    (
        "bad placeholder in flags",
        [{"site": "a", "flags": ["{nope}"]}],
        None,
        "pipeline.sites[0].flags[0] = '{nope}': unknown placeholder {nope}",
    ),
]


@pytest.mark.parametrize(
    ("case", "sites", "groups", "expected"), BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES]
)
def test_a_bad_entry_or_group_exits_2_naming_it_and_nothing_runs(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    sites: list[Any],
    groups: dict[str, Any] | None,
    expected: str,
) -> None:
    """Each bad entry, group or match makes `run` and `validate` exit 2 naming the entry."""
    config = write(tmp_path, sites=sites, **({"groups": groups} if groups else {}))
    for command in ("validate", "run"):
        try:
            code = main([command, "--config", str(config)])
        except SystemExit as exc:
            code = int(exc.code or 0)
        err = capsys.readouterr().err
        assert code == 2, err
        assert expected in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "output").exists()


def test_a_site_without_an_entry_has_the_config_s_settings(tmp_path: Path) -> None:
    """`RunPlan.site` of a site the plan has no entry for: the config's timeout, attempts,
    env and memory limit, and no flags, group or priority of its own."""
    from flows.config import SiteSettings

    plan = load_plan(write(tmp_path, sites=["a.com"], timeout=77, memory_limit=300))
    assert plan.site("elsewhere.com") == SiteSettings(
        77, 3, env={"SHARED": "config", "BOTH": "config"}, memory_limit=300
    )


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"flags": ["--ok", "a\0b"]}, "pipeline.sites[0].flags[1] = 'a\\x00b': expected no NUL"),
        ({"env": {"": "x"}}, "pipeline.sites[0].env.'': expected a variable name"),
        ({"env": {"A=B": "x"}}, "pipeline.sites[0].env.'A=B': expected a variable name"),
        ({"env": {"A\0": "x"}}, "pipeline.sites[0].env.'A\\x00': expected a variable name"),
        ({"env": {"A": "x\0"}}, "pipeline.sites[0].env.'A': expected a variable name"),
    ],
)
def test_an_entry_s_flags_and_env_that_the_os_cannot_take_are_named(
    tmp_path: Path, entry: dict[str, Any], named: str
) -> None:
    """An entry's flags and env reach the OS as argv and environment: a NUL anywhere, an
    empty variable name or one with '=' is an error naming the entry's key."""
    found = problems(tmp_path, sites=[{"site": "a.com", **entry}])
    assert any(named in problem for problem in found), found


def test_an_entry_s_clean_flags_and_env_are_no_problem(tmp_path: Path) -> None:
    """The same keys without NUL or '=' in a name load as given."""
    plan = load_plan(
        write(tmp_path, sites=[{"site": "a.com", "flags": ["--x"], "env": {"A": "b=c"}}])
    )
    assert plan.site("a.com").flags == ("--x",) and plan.site("a.com").env["A"] == "b=c"


def test_what_an_entry_does_not_set_is_the_config_s(tmp_path: Path) -> None:
    """A plain name, and a mapping entry that sets only its priority, take the config's
    timeout, attempts, env and memory limit; an entry's own memory limit is its own."""
    from flows.config import SiteSettings

    plan = load_plan(
        write(
            tmp_path,
            memory_limit=300,
            sites=[
                "plain.com",
                {"site": "first.com", "priority": 5},
                {"site": "small.com", "memory_limit": 50},
            ],
        )
    )
    env = {"SHARED": "config", "BOTH": "config"}
    assert plan.site("plain.com") == SiteSettings(600, 3, env=env, memory_limit=300)
    assert plan.site("first.com") == SiteSettings(600, 3, env=env, priority=5, memory_limit=300)
    assert plan.site("small.com").memory_limit == 50
