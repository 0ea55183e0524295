"""Config and site-name validation, without a Prefect server."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.config import (
    ConfigError,
    build_argv,
    check_sites,
    load_plan,
    parse_config,
    site_dir_name,
    site_output_dir,
)
from tests.conftest import cli_in_process, count_config_reads, write_config

BAD_CONFIGS = [
    ("yaml syntax", "pipeline: [unclosed\n", "YAML syntax error at line"),
    ("unknown key", "pipeline:\n  sites: [a]\n  banana: 1\n", "pipeline.banana: unknown key"),
    (
        "unknown nested key",
        "pipeline:\n  sites: [a]\n  async_settings: {nope: 1}\n",
        "pipeline.async_settings.nope: unknown key",
    ),
    ("wrong type", "pipeline:\n  sites: [a]\n  timeout: soon\n", "pipeline.timeout = 'soon'"),
    (
        "string for int",
        "pipeline:\n  sites: [a]\n  retry_count: '3'\n",
        "pipeline.retry_count = '3'",
    ),
    (
        "zero timeout",
        "pipeline:\n  sites: [a]\n  timeout: 0\n",
        "pipeline.timeout = 0: expected greater than 0",
    ),
    (
        "negative cap",
        "pipeline:\n  sites: [a]\n  max_concurrent_sites: -1\n",
        "pipeline.max_concurrent_sites = -1",
    ),
    ("zero attempts", "pipeline:\n  sites: [a]\n  retry_count: 0\n", "pipeline.retry_count = 0"),
    (
        "no {site}",
        "pipeline:\n  sites: [a]\n  command: [python, x.py]\n",
        "pipeline.command = ['python', 'x.py']: expected an element containing '{site}'",
    ),
    (
        "unknown placeholder",
        "pipeline:\n  sites: [a]\n  command: ['{site}', '{nope}']\n",
        "unknown placeholder {nope}",
    ),
    ("empty site list", "pipeline:\n  sites: []\n", "pipeline.sites: expected at least one site"),
    ("no sites at all", "pipeline:\n  timeout: 5\n", "pipeline.sites: required"),
    (
        "alias mismatch",
        "pipeline:\n  sites: [a]\n  max_concurrent_sites: 5\n"
        "  async_settings: {semaphore_limit: 3}\n",
        "pipeline.async_settings.semaphore_limit = 3: it is an alias of max_concurrent_sites (5)",
    ),
    (
        "bad backoff",
        "pipeline:\n  sites: [a]\n  async_settings: {retry_backoff: random}\n",
        "pipeline.async_settings.retry_backoff = 'random'",
    ),
    ("not a mapping", "- a\n- b\n", "expected a mapping with a 'pipeline:' key"),
    ("no pipeline key", "sites: [a]\n", "sites: unknown key"),
    ("bad site", "pipeline:\n  sites: [good.com, '-rf']\n", "pipeline.sites[1] = '-rf'"),
    (
        "both sites and file",
        "pipeline:\n  sites: [a]\n  sites_file: s.txt\n",
        "expected either sites or sites_file, not both",
    ),
    ("missing sites file", "pipeline:\n  sites_file: nowhere.txt\n", "cannot read it"),
    (
        "missing working dir",
        "pipeline:\n  sites: [a]\n  working_dir: nowhere\n",
        "pipeline.working_dir = 'nowhere': expected an existing folder",
    ),
    (
        "unknown task runner",
        "pipeline:\n  sites: [a]\n  task_runner: {kind: ray}\n",
        "pipeline.task_runner.kind = 'ray': expected 'threads' or 'dask'",
    ),
    (
        "dask option for threads",
        "pipeline:\n  sites: [a]\n  task_runner: {n_workers: 2}\n",
        "pipeline.task_runner.n_workers = 2: only for kind dask",
    ),
    (
        "local option for a remote cluster",
        "pipeline:\n  sites: [a]\n  task_runner: {kind: dask, address: 'tcp://h:8786', "
        "n_workers: 2}\n",
        "pipeline.task_runner.n_workers = 2: only for a local cluster (address: null)",
    ),
    (
        "api_patience zero",
        "pipeline:\n  sites: [a]\n  api_patience: 0\n",
        "pipeline.api_patience = 0: expected greater than 0",
    ),
    (
        "NUL in a path (found by the fuzzer)",
        'pipeline:\n  sites: [a]\n  output_dir: "o\\0"\n',
        "pipeline.output_dir = 'o\\x00': expected a path without a NUL character",
    ),
    (
        "NUL in the command",
        'pipeline:\n  sites: [a]\n  command: ["{site}", "x\\0"]\n',
        "pipeline.command[1] = 'x\\x00': expected no NUL character",
    ),
    (
        "'=' in an environment name",
        "pipeline:\n  sites: [a]\n  env: {'A=B': x}\n",
        "pipeline.env.'A=B': expected a variable name",
    ),
    (
        "invalid non-retryable error pattern",
        "pipeline:\n  sites: [a]\n  non_retryable_errors: ['^ok', '(unclosed']\n",
        "pipeline.non_retryable_errors[1] = '(unclosed': expected a regular expression",
    ),
    (
        "stall_timeout zero",
        "pipeline:\n  sites: [a]\n  stall_timeout: 0\n",
        "pipeline.stall_timeout = 0: expected greater than 0",
    ),
    (
        "stall_timeout negative",
        "pipeline:\n  sites: [a]\n  stall_timeout: -5\n",
        "pipeline.stall_timeout = -5: expected greater than 0",
    ),
    (
        "keep_logs zero",
        "pipeline:\n  sites: [a]\n  keep_logs: 0\n",
        "pipeline.keep_logs = 0: expected greater than or equal to 1",
    ),
    (
        "halt count zero",
        "pipeline:\n  sites: [a]\n  halt: {failed: 0}\n",
        "pipeline.halt.failed = 0: expected greater than or equal to 1",
    ),
    (
        "halt percentage zero",
        "pipeline:\n  sites: [a]\n  halt: {failed: '0%'}\n",
        "pipeline.halt.failed = '0%': expected a percentage in (0, 100]",
    ),
    (
        "halt percentage above 100",
        "pipeline:\n  sites: [a]\n  halt: {failed: '101%'}\n",
        "pipeline.halt.failed = '101%': expected a percentage in (0, 100]",
    ),
    (
        "halt neither count nor percentage",
        "pipeline:\n  sites: [a]\n  halt: {failed: lots}\n",
        "pipeline.halt.failed = 'lots': expected a count >= 1 or a percentage in (0, 100]",
    ),
    (
        "halt without a rule",
        "pipeline:\n  sites: [a]\n  halt: {when: now}\n",
        "pipeline.halt.failed: required",
    ),
    (
        "halt when unknown",
        "pipeline:\n  sites: [a]\n  halt: {failed: 2, when: later}\n",
        "pipeline.halt.when = 'later': expected 'soon' or 'now'",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_config_exits_2_and_names_the_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    text: str,
    expected: str,
    command: str,
) -> None:
    """Each bad config makes `validate` and `run` exit 2, naming the key; nothing runs."""
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    code, _, err = cli_in_process([command, "--config", str(config)], capsys)
    assert code == 2, err
    assert expected in err, err
    assert all(line.startswith("site-pipeline: error: ") for line in err.splitlines()), err
    assert "Traceback" not in err
    assert not (tmp_path / "output").exists()  # nothing half-ran


def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    """Several problems in one file are all reported, one line each, each with its key."""
    with pytest.raises(ConfigError) as caught:
        parse_config("pipeline:\n  sites: [a]\n  timeout: -1\n  retry_count: 0\n  extra: 1\n")
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert any("pipeline.timeout = -1" in p for p in problems)
    assert any("pipeline.retry_count = 0" in p for p in problems)
    assert any("pipeline.extra: unknown key" in p for p in problems)


def test_missing_config_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config path that doesn't exist exits 2 and names the path."""
    code, _, err = cli_in_process(["validate", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert "nope.yaml" in err and "cannot read it" in err


@pytest.mark.parametrize(
    ("site", "reason"),
    [
        ("-rf", "must not start with '-'"),
        ("--site=x", "must not start with '-'"),
        ("a b", "whitespace"),
        ("tab\there", "whitespace"),
        ("new\nline", "whitespace"),
        ("nul\x00byte", "control characters"),
        ("esc\x1b[0m", "control characters"),
        ("../../etc", "'..' path segments"),
        ("a/../b", "'..' path segments"),
        ("..", "'..' path segments"),
        (".", "'..' path segments"),
        ("", "non-empty"),
        ("x" * 600, "at most 512 characters"),
    ],
)
def test_bad_site_names_are_rejected_up_front(site: str, reason: str) -> None:
    """Names that could become options, break argv or climb out of a folder are refused."""
    with pytest.raises(ConfigError) as caught:
        check_sites(["ok.com", site])
    assert reason in str(caught.value)
    assert "sites[1]" in str(caught.value)


def test_bad_cli_site_exits_2_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run --site ../../etc` is refused before any Prefect call, with exit status 2."""
    config = write_config(tmp_path, ["ok-a"])
    code, _, err = cli_in_process(["run", "--config", str(config), "--site", "../../etc"], capsys)
    assert code == 2
    assert "'../../etc'" in err and "path segments" in err
    assert not (tmp_path / "timeline.tsv").exists()


def test_opaque_site_names_are_accepted() -> None:
    """URLs, plugin names and shell metacharacters are all just names."""
    sites, warnings = check_sites(
        ["https://example.com/lawyers?page=2", "lawyer_directory", "x;rm$(whoami)", "ünïcode.de"]
    )
    assert len(sites) == 4 and warnings == []


def test_duplicate_sites_are_dropped_with_a_warning() -> None:
    """Duplicates keep their first position and produce one warning each."""
    sites, warnings = check_sites(["a", "b", "a", "c", "b"])
    assert sites == ["a", "b", "c"]
    assert len(warnings) == 2 and "duplicate" in warnings[0]


def test_site_folder_never_leaves_the_output_dir(tmp_path: Path) -> None:
    """Odd names map to a safe, unique folder directly inside output_dir."""
    names = ["https://a.com/x", "https:__a.com_x", "x;rm$(whoami)", "a\\b", "plain.example"]
    folders = {site_output_dir(tmp_path, name) for name in names}
    assert len(folders) == len(names)
    assert all(folder.parent == tmp_path for folder in folders)
    assert site_dir_name("plain.example") == "plain.example"


@pytest.mark.parametrize("name", ["CON", "con", "nul.txt", "COM1", "lpt9.log", "AUX"])
def test_windows_device_names_get_a_folder_windows_can_create(name: str) -> None:
    """CON, NUL.txt, COM1...: device names on Windows; their folder gets a '_' and a hash."""
    folder = site_dir_name(name)
    assert folder.startswith(f"_{name}-") and len(folder) == len(name) + 10
    assert site_dir_name("com10") == "com10" and site_dir_name("console") == "console"


def test_a_long_site_name_runs_with_a_shortened_folder(tmp_path: Path) -> None:
    """A 300-character name passes validation, and its folder is cut to 100 characters plus
    a hash that keeps it unique, so it can be created (no 'File name too long')."""
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    assert check_sites([long_a, long_b])[0] == [long_a, long_b]
    folders = [site_output_dir(tmp_path, name) for name in (long_a, long_b)]
    assert folders[0] != folders[1] and all(len(f.name) == 109 for f in folders)
    for folder in folders:
        folder.mkdir()


def test_group_control_where_there_are_no_process_groups_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """process_control: group on a platform without POSIX process groups: exit 2, naming the
    key and the choices; auto is fine there (it is tree)."""
    from flows.process import groups as procgroup

    monkeypatch.setattr(procgroup, "supported", lambda: False)
    config = write_config(tmp_path, ["ok-a"], process_control="group")
    code, _, err = cli_in_process(["validate", "--config", str(config)], capsys)
    assert code == 2
    assert "pipeline.process_control = 'group'" in err and "expected auto or tree" in err
    auto = write_config(tmp_path, ["ok-a"], process_control="auto")
    assert cli_in_process(["validate", "--config", str(auto)], capsys)[0] == 0


def test_argv_fills_placeholders_once_and_literally(tmp_path: Path) -> None:
    """A site holding '{attempt}' or shell syntax stays one literal argv element."""
    config = parse_config(
        "pipeline:\n  sites: [a]\n  command: ['{python}', 'p.py', '--site={site}', '{attempt}',"
        " '{output_dir}']\n  default_flags: [--emit-status]\n"
    )
    argv = build_argv(config, "x{attempt};$(id)", 2, tmp_path)
    assert argv[1:] == ["p.py", "--site=x{attempt};$(id)", "2", str(tmp_path), "--emit-status"]


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sites_file, output_dir and working_dir are relative to the config file, not the cwd."""
    folder = tmp_path / "project"
    (folder / "work").mkdir(parents=True)
    (folder / "sites.txt").write_text("# comment\na.com\n\nb.com  # trailing\n", encoding="utf-8")
    (folder / "config.yaml").write_text(
        yaml.safe_dump(
            {"pipeline": {"sites_file": "sites.txt", "working_dir": "work", "output_dir": "out"}}
        )
    )
    monkeypatch.chdir(tmp_path)
    plan = load_plan(folder / "config.yaml")
    assert plan.sites == ("a.com", "b.com")
    assert plan.working_dir == folder / "work"
    assert plan.output_dir == folder / "out"


def test_config_is_found_by_flag_then_env_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config wins over $SITE_PIPELINE_CONFIG, which wins over ./config.yaml."""
    for name in ("cwd", "env", "flag"):
        (tmp_path / name).mkdir()
        write_config(tmp_path / name, [f"{name}.com"])
    monkeypatch.chdir(tmp_path / "cwd")
    assert load_plan().sites == ("cwd.com",)
    monkeypatch.setenv("SITE_PIPELINE_CONFIG", str(tmp_path / "env" / "config.yaml"))
    assert load_plan().sites == ("env.com",)
    assert load_plan(tmp_path / "flag" / "config.yaml").sites == ("flag.com",)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--max-concurrent", "0"],
        ["run", "--max-concurrent", "many"],
        ["run", "--bogus"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_cli_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown commands, unknown flags and bad numbers are usage errors (exit 2)."""
    code, _, err = cli_in_process(argv, capsys)
    assert code == 2
    assert "usage:" in err or "error:" in err


def test_site_and_sites_file_together_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--site and --sites-file are mutually exclusive."""
    config = write_config(tmp_path, ["a"])
    (tmp_path / "s.txt").write_text("b\n")
    code, _, err = cli_in_process(
        ["run", "--config", str(config), "--site", "a", "--sites-file", str(tmp_path / "s.txt")],
        capsys,
    )
    assert code == 2 and "not both" in err


def test_halt_reads_a_count_or_a_percentage() -> None:
    """`halt.failed` is a count (3) or a share ("30%"); `when` defaults to soon, `min_done`
    to 1; no `halt` is off."""
    assert parse_config("pipeline: {sites: [a]}").halt is None
    count = parse_config("pipeline: {sites: [a], halt: {failed: 3}}").halt
    assert count is not None
    assert (count.failed, count.failed_percent, count.min_done, count.when) == (3, None, 1, "soon")
    share = parse_config(
        "pipeline: {sites: [a], halt: {failed: ' 12.5 %', min_done: 10, when: now}}"
    ).halt
    assert share is not None
    assert (share.failed, share.failed_percent, share.min_done, share.when) == (
        None,
        12.5,
        10,
        "now",
    )
    assert parse_config("pipeline: {sites: [a], halt: {failed: '100%'}}").halt is not None


def test_non_retryable_errors_default_to_python_import_and_syntax_errors() -> None:
    """By default the causes of a broken install or broken code are not retried; `[]` turns
    the rule off."""
    patterns = parse_config("pipeline: {sites: [a]}").non_retryable_error_patterns()
    for cause in (
        "ModuleNotFoundError: No module named 'pandas'",
        "ImportError: cannot import name 'save_schema_matrix' from 'x'",
        "SyntaxError: invalid syntax",
        "IndentationError: unexpected indent",
    ):
        assert any(p.search(cause) for p in patterns), cause
    for cause in ("ConnectionError: reset", "ValueError: ImportError: inside a message"):
        assert not any(p.search(cause) for p in patterns), cause
    off = parse_config("pipeline: {sites: [a], non_retryable_errors: []}")
    assert off.non_retryable_error_patterns() == []


@pytest.mark.parametrize("where", ["config", "--sites-file"])
def test_a_sites_file_saved_on_windows_reads_as_meant(tmp_path: Path, where: str) -> None:
    """A sites file with a UTF-8 BOM, CRLF line ends and trailing blanks gives the names the
    user typed, the first one included."""
    (tmp_path / "sites.txt").write_bytes(
        b"\xef\xbb\xbffirst.com\r\nsecond.com  \r\n\r\n# a comment\r\nthird.com\t\r\n"
    )
    if where == "config":
        config = tmp_path / "config.yaml"
        config.write_text("pipeline:\n  sites_file: sites.txt\n", encoding="utf-8")
        plan = load_plan(config)
    else:
        plan = load_plan(write_config(tmp_path, ["x"]), sites_file="sites.txt")
    assert plan.sites == ("first.com", "second.com", "third.com")


def test_a_config_saved_on_windows_reads_as_meant(tmp_path: Path) -> None:
    """A config.yaml with a UTF-8 BOM and CRLF line ends is read as written."""
    config = tmp_path / "config.yaml"
    config.write_bytes(b"\xef\xbb\xbfpipeline:\r\n  sites: [a.com, b.com]   \r\n  timeout: 30\r\n")
    plan = load_plan(config)
    assert plan.sites == ("a.com", "b.com") and plan.config.timeout == 30


def test_shipped_config_is_valid() -> None:
    """The root config.yaml validates and runs the demo pipeline, honestly named."""
    plan = load_plan(Path(__file__).resolve().parents[2] / "config.yaml")
    assert "examples/demo_site.py" in plan.config.command
    assert len(plan.sites) >= 3


def test_dask_without_the_extra_exits_2_naming_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """kind: dask where prefect-dask is not installed: exit 2, naming the extra to install."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "prefect_dask" else real_find_spec(name, *a),
    )
    config = write_config(tmp_path, ["ok-a"], task_runner={"kind": "dask"})
    code, _, err = cli_in_process(["validate", "--config", str(config)], capsys)
    assert code == 2
    assert "pipeline.task_runner.kind = 'dask': prefect-dask is not installed" in err
    assert 'pip install -e ".[dask]"' in err


def test_config_files_reads_each_file_once_whatever_path_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ConfigFiles` (one command's reads): the same file asked for again, by another path
    (relative, through a link) is not read again, and the plan keeps the path asked for; a
    file that can't be read gives its error each time, read once; another file is read."""
    from flows.config import ConfigFiles, make_plan

    reads = count_config_reads(monkeypatch)
    config = write_config(tmp_path, ["ok-a"])
    other = tmp_path / "other"
    other.mkdir()
    link = other / "linked.yaml"
    link.symlink_to(config)
    broken = tmp_path / "broken.yaml"
    broken.write_text("pipeline: [", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    configs = ConfigFiles()
    first = configs.read(str(config))
    assert configs.read("config.yaml").config is first.config
    assert configs.read(link).path == link
    assert make_plan(configs.read(link)).config_path == link
    for _ in range(2):
        with pytest.raises(ConfigError, match="YAML syntax error"):
            configs.read(broken)
    assert reads == [str(config), str(broken)]
    assert ConfigFiles().read(config).config == first.config
    assert reads == [str(config), str(broken), str(config)]
