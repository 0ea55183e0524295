"""Notifications and dead-run detection, as Prefect blocks and automations made by `setup`.

The Prefect server sends the notifications (its automations service), so they work only
with a server that keeps running (`prefect server start`), not with a server that stops with
an ad hoc run, and the server needs outbound access to the webhook.

- Each `pipeline.notify` entry becomes a notification block (the secret URL is stored in
  the block, read from the entry's environment variable, never printed) and an automation
  that sends it when a `site-pipeline` flow run ends in one of the entry's outcomes.
- One more automation marks a flow run Crashed when its heartbeats stop (deployments send
  them every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds, see `prefect.yaml`); that Crashed
  state then notifies like any other. The change is not forced, so a run that already
  ended keeps its state.

Everything is found by name and created or updated only when it differs, so `setup` can run
again and again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from prefect.blocks.core import Block
from prefect.blocks.notifications import (
    CustomWebhookNotificationBlock,
    DiscordWebhook,
    SlackWebhook,
)
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from flows.config import ConfigError, NotifyConfig
from flows.names import FLOW_NAME

HEARTBEAT_AUTOMATION = "site-pipeline: crash runs whose heartbeats stopped"

DISCORD_PATH = re.compile(r"/webhooks/([^/]+)/([^/]+)/?$")  # .../api/webhooks/<id>/<token>
OUTCOME_EVENTS = {
    "failed": "prefect.flow-run.Failed",
    "crashed": "prefect.flow-run.Crashed",
    "completed": "prefect.flow-run.Completed",
    "cancelled": "prefect.flow-run.Cancelled",
}
SUBJECT = "site-pipeline: flow run {{ flow_run.name }} {{ flow_run.state.name }}"
BODY = (
    "Flow run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
    "{{ flow_run.state.message }}\n"
    # The link needs PREFECT_UI_URL on the server (see the README); else the run's id.
    "{{ (flow_run|ui_url) or ('flow run id ' ~ flow_run.id) }}"
)


def block_name(entry: NotifyConfig) -> str:
    """`site-pipeline-webhook-site-pipeline-hook-url` for kind webhook, url_env
    SITE_PIPELINE_HOOK_URL: one block per (kind, variable)."""
    return f"site-pipeline-{entry.kind}-{entry.url_env.lower().replace('_', '-')}"


def automation_name(entry: NotifyConfig) -> str:
    return f"site-pipeline: notify {block_name(entry)}"


def secret_urls(entries: Sequence[NotifyConfig]) -> dict[str, str]:
    """Each entry's URL from its environment variable. Raises `ConfigError` naming every
    missing or unusable one (the value itself is never shown)."""
    urls, problems = {}, []
    for index, entry in enumerate(entries):
        value = os.environ.get(entry.url_env, "")
        where = f"pipeline.notify[{index}].url_env = {entry.url_env!r}"
        if not value:
            problems.append(f"{where}: expected that environment variable to hold the URL")
            continue
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(f"{where}: expected an http(s) URL in it (its value is not shown)")
            continue
        if entry.kind == "discord" and not DISCORD_PATH.search(parts.path):
            problems.append(
                f"{where}: expected a Discord webhook URL, "
                "https://discord.com/api/webhooks/<id>/<token>"
            )
            continue
        urls[block_name(entry)] = value
    if problems:
        raise ConfigError(problems)
    return urls


def _block(entry: NotifyConfig, url: str) -> Block:
    if entry.kind == "slack":
        return SlackWebhook(url=url)  # type: ignore[arg-type]  # pydantic makes it a SecretStr
    if entry.kind == "discord":
        found = DISCORD_PATH.search(urlsplit(url).path)
        assert found is not None  # noqa: S101  (secret_urls checked it)
        webhook_id, webhook_token = found.groups()
        return DiscordWebhook(webhook_id=webhook_id, webhook_token=webhook_token)  # type: ignore[arg-type]
    # The URL is a secret: the block's `url` is a template filled from its `secrets`.
    return CustomWebhookNotificationBlock(
        name=block_name(entry),
        url="{{url}}",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
        secrets={"url": url},  # type: ignore[arg-type]
        headers=None,
        cookies=None,
    )


def _same_block(existing: Block, wanted: Block) -> bool:
    """Same type and the same fields, secrets compared by value (never shown)."""

    def plain(block: Block) -> dict[str, Any]:
        fields = {}
        for key in type(block).model_fields:
            value = getattr(block, key)
            fields[key] = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        return fields

    return type(existing) is type(wanted) and plain(existing) == plain(wanted)


def ensure_block(entry: NotifyConfig, url: str) -> tuple[Block, str]:
    """Create or update the entry's block; (the saved block, what changed)."""
    name = block_name(entry)
    wanted = _block(entry, url)
    try:
        existing: Block | None = type(wanted).load(name)  # type: ignore[assignment]  # sync here
    except ValueError:  # no block document of that name
        existing = None
    if existing is not None and _same_block(existing, wanted):
        return existing, f"notification block {name!r} (unchanged)"
    wanted.save(name, overwrite=True)
    verb = "updated" if existing is not None else "created"
    return wanted, f"{verb} notification block {name!r} ({entry.kind})"


def _flow_resource() -> ResourceSpecification:
    return ResourceSpecification(
        {"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME}
    )


def notify_automation(entry: NotifyConfig, block_document_id: Any) -> AutomationCore:
    return AutomationCore(
        name=automation_name(entry),
        description=(
            f"Sends {block_name(entry)} when a {FLOW_NAME} flow run ends "
            f"{', '.join(entry.on)} (made by `site-pipeline setup`)"
        ),
        trigger=EventTrigger(
            expect={OUTCOME_EVENTS[outcome] for outcome in entry.on},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=_flow_resource(),
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def heartbeat_automation(grace_seconds: float) -> AutomationCore:
    """Crash a run with no heartbeat for `grace_seconds` (setup's default: 90 s, three beats
    of the 30 s that `prefect.yaml` sets, Prefect's minimum frequency)."""
    grace = timedelta(seconds=grace_seconds)
    return AutomationCore(
        name=HEARTBEAT_AUTOMATION,
        description=(
            f"Marks a {FLOW_NAME} flow run Crashed when no heartbeat came for "
            f"{grace.total_seconds():g} s (made by `site-pipeline setup`)"
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *OUTCOME_EVENTS.values()},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=_flow_resource(),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=grace,
        ),
        actions=[
            ChangeFlowRunState(
                name="Crashed",
                # Never forced: a heartbeat sent just before the run completed can arrive or
                # open a window after its Completed state (PrefectHQ/prefect#18653, #21932);
                # unforced, Prefect refuses Crashed from a terminal state and takes it from
                # Running (see docs/operations.md, "Dead runs don't stay Running").
                force=False,
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {grace.total_seconds():g} s: its process or "
                    "machine is gone (site-pipeline setup's automation)"
                ),
            )
        ],
    )


def same_automation(stored: Mapping[str, Any], wanted: AutomationCore) -> bool:
    """Whether the automation the server holds (`stored`, as JSON) is `wanted`. Compared as
    models, not as JSON: a trigger's `expect`, `after` and `for_each` are sets, which the
    server keeps as lists in the order of the process that wrote them; two processes (each
    with its own string hashing) may list the same set in two orders."""
    fields = set(AutomationCore.model_fields)
    found = AutomationCore.model_validate({k: v for k, v in stored.items() if k in fields})
    return found.model_dump() == wanted.model_dump()


def ensure_automation(client: SyncPrefectClient, wanted: AutomationCore) -> str:
    """Create the automation, or update the one of that name when it differs."""
    found = client.read_automations_by_name(wanted.name)
    if not found:
        client.create_automation(wanted)
        return f"created automation {wanted.name!r}"
    current = found[0]
    for extra in found[1:]:  # made twice by hand, or by an old version: keep one
        client.delete_automation(extra.id)
    if same_automation(current.model_dump(mode="json"), wanted):
        return f"automation {wanted.name!r} (unchanged)"
    client.update_automation(current.id, wanted)
    return f"updated automation {wanted.name!r}"


def setup_notifications(
    client: SyncPrefectClient, entries: Sequence[NotifyConfig], heartbeat_grace: float
) -> list[str]:
    """Blocks and automations for `entries`, and the heartbeat automation. Raises
    `ConfigError` (before changing anything) when a URL variable is missing."""
    urls = secret_urls(entries)
    changes = []
    for entry in entries:
        block, change = ensure_block(entry, urls[block_name(entry)])
        changes.append(change)
        document = client.read_block_document_by_name(
            block_name(entry), block.get_block_type_slug()
        )
        changes.append(ensure_automation(client, notify_automation(entry, document.id)))
    changes.append(ensure_automation(client, heartbeat_automation(heartbeat_grace)))
    return changes
