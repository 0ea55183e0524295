"""What `setup` asks Prefect to create for notifications, checked without a server."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.config import ConfigError, NotifyConfig, load_plan, parse_config
from flows.ops.notify import (
    OUTCOME_EVENTS,
    _block,
    block_name,
    heartbeat_automation,
    notify_automation,
    same_automation,
    secret_urls,
)
from flows.ops.provision import DEFAULT_HEARTBEAT_GRACE, check_heartbeat_grace, setup
from tests.conftest import ROOT, write_config
from tests.support.processes import run_tied


def entry(kind: str = "webhook", on: list[str] | None = None) -> NotifyConfig:
    return NotifyConfig.model_validate(
        {"kind": kind, "url_env": "HOOK_URL", **({"on": on} if on else {})}
    )


def test_on_defaults_to_failed_and_crashed() -> None:
    """Absent `on`: failed and crashed runs notify; completed and cancelled don't."""
    assert entry().on == ["failed", "crashed"]


def test_missing_or_bad_urls_are_named_without_their_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every missing or unusable variable is one line naming it; a value is never shown."""
    monkeypatch.delenv("HOOK_URL", raising=False)
    with pytest.raises(ConfigError) as missing:
        secret_urls([entry()])
    assert str(missing.value) == (
        "pipeline.notify[0].url_env = 'HOOK_URL': expected that environment variable to "
        "hold the URL"
    )
    monkeypatch.setenv("HOOK_URL", "ftp://secret-value")
    with pytest.raises(ConfigError) as bad:
        secret_urls([entry()])
    assert "expected an http(s) URL" in str(bad.value) and "secret-value" not in str(bad.value)
    monkeypatch.setenv("HOOK_URL", "https://discord.com/api/webhooks")
    with pytest.raises(ConfigError, match="expected a Discord webhook URL"):
        secret_urls([entry("discord")])


@pytest.mark.filterwarnings("ignore:'imghdr' is deprecated:DeprecationWarning")  # apprise
def test_each_kind_gets_its_block_with_the_url_kept_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """discord: id and token from the URL; slack: the URL; webhook: the URL only in the
    block's secrets (its `url` is a template), the message in the JSON body."""
    discord = _block(entry("discord"), "https://discord.com/api/webhooks/123/tok-en")
    assert discord.webhook_id.get_secret_value() == "123"  # type: ignore[attr-defined]
    assert discord.webhook_token.get_secret_value() == "tok-en"  # type: ignore[attr-defined]
    slack = _block(entry("slack"), "https://hooks.slack.com/services/x")
    assert slack.url.get_secret_value() == "https://hooks.slack.com/services/x"  # type: ignore[attr-defined]
    hook = _block(entry(), "http://127.0.0.1:9/hook")
    assert hook.url == "{{url}}"  # type: ignore[attr-defined]
    assert hook.secrets.get_secret_value() == {"url": "http://127.0.0.1:9/hook"}  # type: ignore[attr-defined]
    assert hook.json_data["text"] == "{{subject}}\n{{body}}"  # type: ignore[attr-defined]
    assert block_name(entry()) == "site-pipeline-webhook-hook-url"


@pytest.mark.parametrize(
    "on", [["failed"], ["failed", "crashed"], ["completed"], ["cancelled", "failed"]]
)
def test_the_automation_fires_on_exactly_the_chosen_outcomes_of_this_flow(on: list[str]) -> None:
    """The trigger expects the state events of `on`, for flow runs of the site-pipeline flow
    only, once per event; the action sends the entry's block with the run's details."""
    automation = notify_automation(entry(on=on), "00000000-0000-0000-0000-000000000001")
    trigger = automation.trigger
    assert trigger.expect == {OUTCOME_EVENTS[outcome] for outcome in on}  # type: ignore[union-attr]
    assert trigger.match_related.model_dump() == {  # type: ignore[union-attr]
        "prefect.resource.role": "flow",
        "prefect.resource.name": "site-pipeline",
    }
    assert trigger.posture == "Reactive" and trigger.threshold == 1  # type: ignore[union-attr]
    (action,) = automation.actions
    assert str(action.block_document_id).endswith("1")  # type: ignore[union-attr]
    assert "flow_run.state.message" in action.body and "ui_url" in action.body  # type: ignore[union-attr]


def test_the_heartbeat_automation_crashes_runs_silent_for_the_grace() -> None:
    """Proactive: after a heartbeat, no heartbeat and no final state for `grace` seconds
    (per flow run) makes the run Crashed."""
    automation = heartbeat_automation(40)
    trigger = automation.trigger
    assert trigger.posture == "Proactive"  # type: ignore[union-attr]
    assert trigger.within == timedelta(seconds=40)  # type: ignore[union-attr]
    assert trigger.after == {"prefect.flow-run.heartbeat"}  # type: ignore[union-attr]
    assert "prefect.flow-run.Completed" in trigger.expect  # type: ignore[union-attr]
    assert trigger.for_each == {"prefect.resource.id"}  # type: ignore[union-attr]
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state == "CRASHED"  # type: ignore[union-attr]
    assert "no heartbeat for 40 s" in (action.message or "")  # type: ignore[union-attr]
    # Unforced, so Prefect refuses to leave Completed (tests/e2e/test_zombies.py shows why)
    assert action.force is False  # type: ignore[union-attr]


HASHED = """
import json, sys
from flows.ops.notify import heartbeat_automation, same_automation
if sys.argv[1] == "write":
    print(json.dumps(heartbeat_automation(90).model_dump(mode="json")))
else:
    print(same_automation(json.loads(sys.stdin.read()), heartbeat_automation(90)))
"""


def test_an_automation_written_by_another_process_is_the_same() -> None:
    """`setup` run again finds its automation unchanged though another process wrote it: a
    trigger's `expect` is a set, which the server keeps as a list in the writer's order, and
    each process hashes strings its own way (under PYTHONHASHSEED 3 and 7 that order differs
    from the reader's; compared as JSON, `setup` once said "updated" by chance)."""

    def python(seed: int, mode: str, given: str | None = None) -> str:
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-c", HASHED, mode]
        done = run_tied(argv, env=env, cwd=ROOT, timeout=60, input=given)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    assert python(7, "read", python(3, "write")).strip() == "True"


def test_an_automation_with_another_grace_or_other_events_is_not_the_same() -> None:
    """A changed grace, or a missing expected event, is an update."""
    wanted = heartbeat_automation(40)
    stored = wanted.model_dump(mode="json")
    assert same_automation(stored, wanted)
    assert not same_automation(stored, heartbeat_automation(41))
    stored["trigger"]["expect"] = sorted(stored["trigger"]["expect"])[1:]
    assert not same_automation(stored, wanted)


@pytest.mark.parametrize("grace", [30, 10, 0.5])
def test_a_grace_not_above_the_shortest_heartbeat_interval_is_refused(grace: float) -> None:
    """A grace of 30 s or less would crash healthy runs between two heartbeats (Prefect sends
    them 30 s apart at the shortest): a one-line error naming the option."""
    with pytest.raises(ConfigError) as caught:
        check_heartbeat_grace(grace)
    assert caught.value.problems == [
        f"--heartbeat-grace {grace:g}: expected more than 30 seconds (Prefect sends a flow "
        "run's heartbeats 30 s apart at the shortest)"
    ]


def test_a_grace_above_the_shortest_heartbeat_interval_is_taken() -> None:
    """31 s, and setup's default of 90 s, pass the check."""
    check_heartbeat_grace(31)
    check_heartbeat_grace(DEFAULT_HEARTBEAT_GRACE)


def test_setup_checks_the_grace_before_it_touches_the_api(tmp_path: Path) -> None:
    """`setup` with a grace of 30 s raises the ConfigError before connecting (its API here
    does not exist), so nothing is created."""
    plan = load_plan(write_config(tmp_path, ["a.com"]))
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(ConfigError, match="--heartbeat-grace 30: expected more than 30"):
            setup(plan, heartbeat_grace=30)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("notify: [{kind: email, url_env: X}]", "pipeline.notify.0.kind = 'email'"),
        ("notify: [{kind: slack, url_env: '1BAD'}]", "pipeline.notify.0.url_env = '1BAD'"),
        ("notify: [{kind: slack, url_env: X, on: [late]}]", "pipeline.notify.0.on.0 = 'late'"),
        ("notify: [{kind: slack, url_env: X, on: []}]", "pipeline.notify.0.on = []"),
        ("learned_timeout: {factor: 0}", "pipeline.learned_timeout.factor = 0"),
        (
            "learned_timeout: {min_runs: 10, window: 5}",
            "pipeline.learned_timeout.window = 5: expected at least min_runs (10)",
        ),
        ("learned_timeout: {floor: -1}", "pipeline.learned_timeout.floor = -1"),
    ],
)
def test_bad_notify_and_learned_timeout_keys_are_named(text: str, expected: str) -> None:
    """Each bad value is a config error that names the key."""
    with pytest.raises(ConfigError) as caught:
        parse_config(f"pipeline:\n  sites: [a]\n  {text}\n")
    assert expected in str(caught.value)


def test_an_unquoted_on_key_is_the_key_on_not_a_boolean() -> None:
    """YAML 1.1 reads a plain `on` as true; as a key it stays "on" (so the issue's own
    example works as written), while `use_async: no` as a value is still false."""
    config = parse_config(
        "pipeline:\n  sites: [a]\n  use_async: no\n"
        "  notify:\n    - kind: discord\n      url_env: X\n      on: [failed, completed]\n"
    )
    assert config.notify[0].on == ["failed", "completed"]
    assert config.use_async is False
