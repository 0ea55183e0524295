"""The CLI's exit statuses and messages, word for word, in-process and fast.

Bad input exits 2 with one `error:` line that names the option or value and what was
expected, and it exits before anything reaches Prefect: here, reaching Prefect (the API
check, the local server, a flow run) fails the test. Ctrl-C exits 130. The real signal
path, from a terminal's SIGINT to a Cancelled flow run, is tests/e2e/test_resume.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows import ops
from flows.cli import main
from flows.cli import run as run_command
from tests.conftest import write_config


@pytest.fixture(autouse=True)
def prefect_is_out_of_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input must be refused before any of these runs."""

    def reached(*_: object, **__: object) -> None:
        raise AssertionError("bad input reached Prefect")

    monkeypatch.setattr(ops, "check_reachable", reached)
    monkeypatch.setattr(ops, "use_local_server", reached)
    monkeypatch.setattr(run_command, "run_plan", reached)


def status_and_stderr(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    assert out == "", out
    return status, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, ["a.com"])


# Our own messages: the whole stderr is this one line.
OURS = {
    "both_site_and_file": (
        ["run", "--site", "a.com", "--sites-file", "{dir}/sites.txt"],
        "site-pipeline: error: --site and --sites-file: expected one or the other, not both",
    ),
    "retry_with_sites": (
        ["run", "--retry-failed", "--site", "a.com"],
        "site-pipeline: error: --retry-failed and --site/--sites-file: expected one or the "
        "other; --retry-failed takes the sites of the run it resumes",
    ),
    "submit_retry_with_sites": (
        ["submit", "--retry-failed", "last", "--site", "a.com"],
        "site-pipeline: error: --retry-failed and --site: expected one or the other",
    ),
    "unknown_param": (
        ["submit", "--param", "speed=3"],
        "site-pipeline: error: --param 'speed=3': unknown parameter 'speed'; expected KEY=VALUE "
        "with KEY one of sites, config_path, max_concurrent_sites, use_async, skip",
    ),
    "param_sites_not_a_list": (
        ["submit", "--param", "sites=a.com"],
        "site-pipeline: error: sites = 'a.com': expected a JSON list of site names",
    ),
    "param_cap_zero": (
        ["submit", "--param", "max_concurrent_sites=0"],
        "site-pipeline: error: max_concurrent_sites = 0: expected a whole number > 0",
    ),
    "param_use_async_text": (
        ["submit", "--param", "use_async=maybe"],
        "site-pipeline: error: use_async = 'maybe': expected true or false",
    ),
    "missing_config": (
        ["validate", "--config", "{dir}/nope.yaml"],
        "site-pipeline: error: config = '{dir}/nope.yaml': cannot read it "
        "(No such file or directory)",
    ),
    "doctor_missing_config": (
        ["doctor", "--fix", "--config", "{dir}/nope.yaml"],
        "site-pipeline: error: config = '{dir}/nope.yaml': cannot read it "
        "(No such file or directory)",
    ),
    "sites_file_mapping_without_sites": (
        ["validate", "--config", "{config}", "--sites-file", "{dir}/hosts.json"],
        "site-pipeline: error: sites_file = '{dir}/hosts.json': expected the key 'sites' (a "
        "list of sites), got keys 'hosts'",
    ),
    "site_that_is_an_option": (
        ["run", "--config", "{config}", "--site=-rf"],
        "site-pipeline: error: --site[0] = '-rf': must not start with '-' (it would be read "
        "as an option)",
    ),
}


@pytest.mark.parametrize("case", sorted(OURS))
def test_bad_input_exits_2_with_exactly_one_line_naming_it(
    case: str, tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad input exits 2, before Prefect, with exactly the expected error line."""
    (tmp_path / "sites.txt").write_text("a.com\n")
    (tmp_path / "hosts.json").write_text('{"hosts": ["a.com"]}')
    argv, line = OURS[case]
    fill = {"dir": str(tmp_path), "config": str(config)}
    status, err = status_and_stderr([part.format(**fill) for part in argv], capsys)
    assert status == 2
    assert err == line.format(**fill) + "\n"


# argparse's messages: the last line is `<prog>: error: <ours>`, after the usage lines.
ARGPARSE = {
    "abbreviated_option": (
        ["run", "--sites", "x"],
        "site-pipeline: error: unrecognized arguments: --sites x",
    ),
    "empty_sites_file": (
        ["run", "--sites-file", ""],
        "site-pipeline run: error: argument --sites-file: '': expected a non-empty value",
    ),
    "blank_config": (
        ["validate", "--config", " "],
        "site-pipeline validate: error: argument --config: ' ': expected a non-empty value",
    ),
    "empty_site": (
        ["run", "--site", ""],
        "site-pipeline run: error: argument --site: '': expected a non-empty value",
    ),
    "cap_zero": (
        ["run", "--max-concurrent", "0"],
        "site-pipeline run: error: argument --max-concurrent: '0': expected a whole number > 0",
    ),
    "cap_not_a_number": (
        ["submit", "--max-concurrent", "two"],
        "site-pipeline submit: error: argument --max-concurrent: 'two': expected a whole "
        "number > 0",
    ),
    "history_limit_negative": (
        ["history", "--limit", "-3"],
        "site-pipeline history: error: argument --limit: '-3': expected a whole number > 0",
    ),
    "heartbeat_grace_text": (
        ["setup", "--heartbeat-grace", "soon"],
        "site-pipeline setup: error: argument --heartbeat-grace: 'soon': expected a whole "
        "number > 0",
    ),
    "deployment_without_slash": (
        ["submit", "--deployment", "adhoc"],
        "site-pipeline submit: error: argument --deployment: 'adhoc': expected FLOW/NAME, "
        "e.g. site-pipeline/adhoc",
    ),
    "deployment_without_name": (
        ["submit", "--deployment", "site-pipeline/"],
        "site-pipeline submit: error: argument --deployment: 'site-pipeline/': expected "
        "FLOW/NAME, e.g. site-pipeline/adhoc",
    ),
    "verbose_and_quiet": (
        ["run", "-v", "-q"],
        "site-pipeline run: error: argument -q/--quiet: not allowed with argument -v/--verbose",
    ),
    "no_command": (
        [],
        "site-pipeline: error: the following arguments are required: COMMAND",
    ),
}


@pytest.mark.parametrize("case", sorted(ARGPARSE))
def test_bad_arguments_exit_2_with_usage_and_the_reason(
    case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed command line exits 2: the usage, then one line naming the option."""
    argv, line = ARGPARSE[case]
    status, err = status_and_stderr(argv, capsys)
    assert status == 2
    assert err.startswith("usage: site-pipeline")
    assert err.splitlines()[-1] == line


def test_ctrl_c_during_a_run_exits_130_with_one_line(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A KeyboardInterrupt that reaches the CLI exits 130 with one line, no traceback."""

    def interrupted(*_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_command, "run_plan", interrupted)
    status, err = status_and_stderr(["run", "--config", str(config)], capsys)
    assert status == 130
    assert err == "site-pipeline: interrupted; pipelines stopped\n"


def test_an_api_failure_under_the_flow_is_one_line_that_names_the_request() -> None:
    """A flow run whose server failed as it ended (Redis down: `set_state` answers 500) is
    one `error:` line naming the status and the request (so the server), not Prefect's
    traceback; a transport error names its request too; any other exception is a bug,
    and stays a traceback (None)."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    url = "http://127.0.0.1:4321/api/flow_runs/abc/set_state"
    request = httpx.Request("POST", url)
    response = httpx.Response(500, request=request)
    status_error = PrefectHTTPStatusError.from_httpx_error(
        httpx.HTTPStatusError("500", request=request, response=response)
    )
    assert run_command.api_failure(status_error) == (
        f"the Prefect API failed: HTTP 500 Internal Server Error for POST {url}; "
        "the flow run may be left Running on that server"
    )
    refused = httpx.ConnectError("All connection attempts failed", request=request)
    assert run_command.api_failure(refused) == (
        "the Prefect API could not be reached: ConnectError: All connection attempts failed "
        f"(POST {url})"
    )
    assert run_command.api_failure(ValueError("a bug")) is None
