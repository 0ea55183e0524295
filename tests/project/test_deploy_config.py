"""prefect.yaml and the deployment-facing commands, without a running server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.flows import Flow, load_flow_from_entrypoint

from flows.cli import deployment_parameters
from flows.config import ConfigError
from tests.conftest import ROOT, run_cli, write_config
from tests.support.servers import free_port, prefect_env


def deployments() -> list[dict[str, Any]]:
    return list(yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"])


def test_every_entrypoint_resolves_to_a_flow() -> None:
    """Each deployment's entrypoint imports and is the `site-pipeline` Prefect flow."""
    for deployment in deployments():
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert isinstance(flow, Flow)
        assert flow.name == "site-pipeline"


def test_deployments_are_adhoc_and_nightly_on_the_process_pool() -> None:
    """adhoc is unscheduled; nightly runs at 02:00 in an explicit timezone; both enforce schemas."""
    by_name = {d["name"]: d for d in deployments()}
    assert set(by_name) == {"adhoc", "nightly"}
    assert by_name["adhoc"]["schedules"] == []
    (schedule,) = by_name["nightly"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"]
    for deployment in by_name.values():
        assert deployment["work_pool"]["name"] == "site-pool"
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["entrypoint"] == "flows/site_pipeline.py:run_sites"


def test_pull_step_sets_the_working_directory() -> None:
    """The pull step is an explicit set_working_directory: a worker knows where the project is."""
    pull = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    assert list(pull[0]) == ["prefect.deployments.steps.set_working_directory"]


@pytest.mark.parametrize(
    ("pairs", "sites", "expected"),
    [
        (["bogus=1"], None, "unknown parameter 'bogus'"),
        (["sites"], None, "unknown parameter"),
        (['sites="a.com"'], None, "expected a JSON list of site names"),
        (['sites=["ok.com", "-rf"]'], None, "sites[1] = '-rf'"),
        ([], ["../../etc"], "sites[0] = '../../etc'"),
        (["max_concurrent_sites=0"], None, "max_concurrent_sites = 0"),
        (["max_concurrent_sites=true"], None, "max_concurrent_sites = True"),
        (["use_async=maybe"], None, "use_async = 'maybe'"),
    ],
)
def test_bad_deployment_parameters_are_refused(
    pairs: list[str], sites: list[str] | None, expected: str
) -> None:
    """Unknown keys, non-list sites, bad site names and bad numbers raise ConfigError."""
    with pytest.raises(ConfigError) as caught:
        deployment_parameters(pairs, sites, None)
    assert expected in str(caught.value)


def test_good_deployment_parameters_are_parsed_as_json() -> None:
    """VALUE is JSON when it parses, else a string; --site and --max-concurrent fill in."""
    params = deployment_parameters(["config_path=/x/config.yaml", "use_async=false"], ["a.com"], 4)
    assert params == {
        "config_path": "/x/config.yaml",
        "use_async": False,
        "sites": ["a.com"],
        "max_concurrent_sites": 4,
    }


def test_submit_with_a_bad_parameter_exits_2_with_one_line(tmp_path: Path) -> None:
    """`submit --param bogus=1` is refused before any API call: one line, exit status 2."""
    env = prefect_env(tmp_path, f"http://127.0.0.1:{free_port()}/api")
    result = run_cli(["submit", "--param", "bogus=1"], env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "site-pipeline: error: --param 'bogus=1': unknown parameter 'bogus'; expected KEY=VALUE "
        "with KEY one of sites, config_path, max_concurrent_sites, use_async, skip"
    ]


@pytest.mark.slow  # three CLI processes, each a Prefect import and a refused connection
@pytest.mark.parametrize("command", [["setup"], ["history"], ["submit", "--site", "a.com"]])
def test_unreachable_server_is_named(tmp_path: Path, command: list[str]) -> None:
    """With PREFECT_API_URL pointing nowhere, the command fails with exit 1 and names the URL."""
    url = f"http://127.0.0.1:{free_port()}/api"
    config = write_config(tmp_path, ["a.com"])
    args = [*command, "--config", str(config)] if command == ["setup"] else command
    result = run_cli(args, prefect_env(tmp_path, url))
    assert result.returncode == 1
    assert f"cannot reach the Prefect API at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_setup_without_any_api_allowed_says_so(tmp_path: Path) -> None:
    """No PREFECT_API_URL and the embedded server disabled: setup explains what to start."""
    config = write_config(tmp_path, ["a.com"])
    env = prefect_env(tmp_path, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false")
    result = run_cli(["setup", "--config", str(config)], env)
    assert result.returncode == 1
    assert "PREFECT_API_URL is not set" in result.stderr


def test_setup_with_bad_config_exits_2(tmp_path: Path) -> None:
    """setup validates the config first: a bad one exits 2 and touches no API."""
    config = write_config(tmp_path, ["a.com"], max_concurrent_sites=0)
    result = run_cli(
        ["setup", "--config", str(config)], prefect_env(tmp_path, "http://127.0.0.1:9/api")
    )
    assert result.returncode == 2
    assert "pipeline.max_concurrent_sites = 0" in result.stderr
