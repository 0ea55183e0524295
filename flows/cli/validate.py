"""`site-pipeline validate`: what a run would do, and the first site's command line; nothing
starts. The start order it prints is the run's own (`flows.start_order`, same inputs)."""

from __future__ import annotations

import json
import sys

from flows.cli.common import EXIT_OK
from flows.config import RunPlan, build_argv, site_output_dir


def validate(plan: RunPlan) -> int:
    """`validate`: what would run, and the first site's command line; nothing starts."""
    site = plan.sites[0]
    argv = build_argv(plan.config, site, 1, site_output_dir(plan.output_dir, site))
    print(f"config: {plan.config_path}")
    more = ", ..." if len(plan.sites) > 5 else ""
    mode = "async" if plan.use_async else "sequential"
    print(f"sites: {len(plan.sites)} ({', '.join(plan.sites[:5])}{more})")
    print(f"cap: {plan.max_concurrent_sites} at once ({mode}), tag {plan.config.concurrency_tag!r}")
    print(
        f"attempts: {plan.config.retry_count}, {plan.config.async_settings.retry_backoff} backoff "
        f"from {plan.config.retry_delay:g}s, timeout {plan.config.timeout:g}s"
    )
    print(f"stops: {_stops(plan)}")
    print(_order(plan))
    print(f"working dir: {plan.working_dir}")
    print(f"output dir: {plan.output_dir}")
    print(f"first site's argv: {json.dumps(argv)}")
    return EXIT_OK


def _order(plan: RunPlan) -> str:
    """`order: longest expected first (...); starts: a, b, ...`: the start order a run would
    use now, from the history on the configured server (`PREFECT_API_URL`); with no server
    set, or one that doesn't answer, by priority and list (the run reads the history)."""
    from flows.start_order import history_window, order_mode, plan_order

    durations: dict[str, list[float]] | None = None
    note = ""
    if order_mode(plan) != "longest_first":
        pass  # the history has no say in this order
    elif not _profile_api_url():  # no Prefect import on this path (validate stays fast)
        note = " (no PREFECT_API_URL: history not read here; the run reads it)"
    else:
        from flows.ops.server import ApiUnreachable, check_reachable

        try:
            check_reachable()
            from flows.engine import baselines

            tables = baselines.summary_tables()
            durations = baselines.success_durations(plan.sites, history_window(plan), tables)
        except (ApiUnreachable, OSError) as exc:
            note = f" (history not read: {exc})"
    order = plan_order(plan, durations)
    more = ", ..." if len(order.sites) > 5 else ""
    return f"{order.line}{note}; starts: {', '.join(order.sites[:5])}{more}"


def _profile_api_url() -> bool:
    """Whether an API URL is set; Prefect is imported only where `flows.api_url` can't tell."""
    from flows import api_url

    # Prefect already imported (`site-pipeline` called in-process): its settings may hold
    # more than the files say (`temporary_settings`), and asking it costs nothing more.
    known = None if "prefect" in sys.modules else api_url.configured()
    if known is not None:
        return known
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _stops(plan: RunPlan) -> str:
    """`stall after 120s; halt: 3 failed (soon); 4 non-retryable error rules; memory over
    500 MB`: what stops an attempt or the run early."""
    config = plan.config
    stall = f"stall after {config.stall_timeout:g}s" if config.stall_timeout else "no stall timeout"
    halt = f"{config.halt.describe()} ({config.halt.when})" if config.halt else "no halt"
    rules = len(config.non_retryable_errors)
    return (
        f"{stall}; {halt}; {rules} non-retryable error rule{'s' if rules != 1 else ''}; "
        f"{_memory(plan)}"
    )


def _memory(plan: RunPlan) -> str:
    """`memory over 500 MB` (`no memory limit`), and `(2 sites their own: a 800 MB, ...)`."""
    limit = plan.config.memory_limit
    text = f"memory over {limit:g} MB" if limit else "no memory limit"
    own = [
        (site, plan.site(site).memory_limit)
        for site in plan.sites
        if plan.site(site).memory_limit != limit
    ]
    if own:
        named = ", ".join(f"{site} {value:g} MB" for site, value in own[:3] if value)
        more = ", ..." if len(own) > 3 else ""
        text += f" ({len(own)} site{'s' if len(own) > 1 else ''} their own: {named}{more})"
    return text
