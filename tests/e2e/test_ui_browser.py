"""The Prefect UI that every run links to, opened in a real Chromium (tests/support/ui_pages.py) on
each kind of server the tool starts: the kept local server a run started, the same server
reused by a second run, and `server start` after it stopped when idle (after a third run
with `local_server_idle: 1`).

One real run (embedded default, no PREFECT_API_URL) on a fresh PREFECT_HOME: a site that
succeeds, one that fails, one that times out, one that succeeds on its retry, two of them in
a group. The page checks reuse its server. Without Chromium or Playwright the tests skip
with the reason; under REQUIRE_BROWSER=1 (.ci/run) they fail instead.

Every page check waits for the text it expects and fails as soon as the UI shows its own
"Can't connect" error: `test_the_checks_fail_when_the_ui_calls_a_wrong_api_url` proves
that they do, on the same server, with the UI told a wrong API URL.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flows.ops import local_server_files as lsfiles
from tests.conftest import ROOT, run_cli, write_config
from tests.support import ui_pages as ui
from tests.support.processes import keepers_under, stop_keepers, tie_keepers
from tests.support.servers import seed_home
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.xdist_group("ui-browser")]

SITES: list[Any] = [
    "ok-a",
    "fail-b",
    {"site": "hang-c", "timeout": 2, "retry_count": 1},
    "flaky-d",
]
NAMES = ["ok-a", "fail-b", "hang-c", "flaky-d"]
STATUSES = {"ok-a": "succeeded", "fail-b": "failed", "hang-c": "timed_out", "flaky-d": "succeeded"}
GROUP = "vendor-host"


@dataclass(frozen=True)
class Run:
    """One `site-pipeline run`: what it printed, its summary, its server."""

    stdout: str
    stderr: str
    summary: dict[str, Any]
    link: str  # the `flow run: URL` line's URL
    api_url: str

    @property
    def flow_run_id(self) -> str:
        return str(self.summary["flow_run_id"])

    @property
    def ui(self) -> str:
        return ui.ui_of(self.api_url)


@dataclass(frozen=True)
class Home:
    folder: Path
    home: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    missing = ui.browser_missing()
    if missing is not None:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    with ui.chromium() as chromium:
        yield chromium


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    opened = ui.new_page(browser)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    """A user's PREFECT_HOME (migrated once, as tests/support/servers.py does), no PREFECT_API_URL;
    its kept server stopped at the end."""
    folder = tmp_path_factory.mktemp("ui")
    home = seed_home(folder / "home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(ROOT))
    # a server start may take more than the default 60 s on a loaded 2-core machine (CI)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    try:
        yield Home(folder, home, env)
    finally:
        stop_keepers(home)


def run_here(where: Home, name: str, idle: float, sites: list[Any]) -> Run:
    """`site-pipeline run` of `sites` in a folder of its own under the home's, the kept
    server staying `idle` s after it."""
    folder = where.folder / name
    folder.mkdir()
    config = write_config(
        folder, sites, local_server_idle=idle, concurrency_tag="site-pipeline", retry_count=2,
        timeout=60, groups={GROUP: {"max_concurrent": 1, "match": "^(ok|flaky)-"}},
    )  # fmt: skip
    summary_path = folder / "summary.json"
    done = run_cli(["run", "--config", str(config), "--summary-json", str(summary_path)], where.env)
    tie_keepers(where.home)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    links = re.findall(r"^flow run: (http\S+)$", done.stdout, re.MULTILINE)
    assert len(links) == 1, done.stdout
    used = re.findall(r"local Prefect server at (http://127\.0\.0\.1:\d+/api)", done.stderr)
    assert len(used) == 1, done.stderr[-3000:]
    assert links[0] == f"{ui.ui_of(used[0])}/runs/flow-run/{summary['flow_run_id']}"
    # Prefect's own "View at" line names the same page
    assert f"View at {links[0]}" in done.stderr, done.stderr[-3000:]
    return Run(done.stdout, done.stderr, summary, links[0], used[0])


@pytest.fixture(scope="module")
def first(home: Home) -> Run:
    """The run that starts the kept server."""
    run = run_here(home, "first", 600, SITES)
    assert "started a local Prefect server at" in run.stderr
    assert f"its UI at {run.ui}" in run.stderr
    return run


@pytest.fixture(scope="module")
def second(home: Home, first: Run) -> Run:
    """A second run on the same server."""
    run = run_here(home, "second", 600, SITES[:2])
    assert "reused the local Prefect server at" in run.stderr
    assert run.api_url == first.api_url
    return run


@pytest.fixture(scope="module")
def on_demand(home: Home, second: Run) -> str:
    """A third run, of one site, whose idle time (1 s) stops the server soon after it; then
    `server start`: the UI's address it printed."""
    run_here(home, "third", 1, ["ok-z"])
    wait_until(lambda: not keepers_under(home.home), "the kept server stopped when idle", 60)
    assert lsfiles.read_state(home.home) is None
    started = run_cli(["server", "start"], home.env)
    tie_keepers(home.home)
    assert started.returncode == 0, started.stdout + started.stderr
    found = re.findall(r"^UI: (http://127\.0\.0\.1:\d+)$", started.stdout, re.MULTILINE)
    assert len(found) == 1, started.stdout
    assert "it stays until `site-pipeline server stop`" in started.stdout
    return found[0]


def site_rows(run: Run) -> dict[str, list[str]]:
    """What the summary table's row of each site must show: its status and its cause."""
    return {
        row["site"]: [row["status"], *([row["cause"]] if row["cause"] else [])]
        for row in run.summary["sites"]
    }


def test_the_first_run_did_what_the_pages_are_checked_for(first: Run) -> None:
    """Some sites failed, one timed out, one succeeded on its retry."""
    sites = {row["site"]: row for row in first.summary["sites"]}
    assert {site: row["status"] for site, row in sites.items()} == STATUSES
    assert sites["flaky-d"]["attempts"] == 2 and sites["fail-b"]["attempts"] == 2


def test_the_printed_link_opens_the_flow_run_with_a_task_run_per_site(
    first: Run, page: Page
) -> None:
    name, state = ui.flow_run_facts(first.api_url, first.flow_run_id)
    assert state == "Failed"
    ui.check_flow_run(page, first.link, name, state, NAMES)


def test_the_artifacts_show_every_site_and_every_symbol_is_readable(first: Run, page: Page) -> None:
    """The summary: each site's row with its status and cause. The failures and health
    artifacts: every character beyond ASCII drawn by some font (no empty box: the health
    strip's timed-out symbol was one)."""
    artifacts = ui.artifacts_of(first.api_url, first.flow_run_id)
    ui.check_summary(
        page, f"{first.ui}/artifacts/artifact/{artifacts['site-pipeline-summary']}",
        site_rows(first),
    )  # fmt: skip
    for key, expect in (("site-pipeline-failures", "fail-b"), ("site-pipeline-health", "hang-c")):
        url = f"{first.ui}/artifacts/artifact/{artifacts[key]}"
        assert ui.unreadable_symbols(page, url, expect) == [], key
        if key == "site-pipeline-health":
            page.get_by_text("◷", exact=False).first.wait_for()  # the timed-out site's strip


def test_the_concurrency_page_shows_the_limit_and_the_group_s(first: Run, page: Page) -> None:
    ui.check_concurrency(page, first.ui, ["site-pipeline", f"site-pipeline:{GROUP}"])


def test_the_checks_fail_when_the_ui_calls_a_wrong_api_url(first: Run, page: Page) -> None:
    """The same page, its UI told another API URL (as the kept server's UI was, before it
    was given its own): the flow run check fails with the UI's "Can't connect"."""
    name, state = ui.flow_run_facts(first.api_url, first.flow_run_id)
    ui.break_ui_api_url(page)
    with pytest.raises(ui.UiBroken, match="Can't connect"):
        ui.check_flow_run(page, first.link, name, state, NAMES)


def test_the_symbol_check_finds_a_character_no_font_has(browser: Browser) -> None:
    """U+0378 is no character at all: no font draws it; ✓ is in every font we rely on."""
    page = ui.new_page(browser)
    try:
        page.set_content("<main><p>done ✓ \u0378</p></main>")
        assert ui.symbols_not_drawn(page) == ["\u0378"]
    finally:
        page.close()


def check_every_page(page: Page, ui_url: str, run: Run, sites: list[str]) -> None:
    """On the server whose UI is at `ui_url`: the run's flow run with a task run per site,
    its summary's rows, its failures and health artifacts with every symbol drawn, and the
    limits on the Concurrency page."""
    api = f"{ui_url}/api"
    name, state = ui.flow_run_facts(api, run.flow_run_id)
    ui.check_flow_run(page, f"{ui_url}/runs/flow-run/{run.flow_run_id}", name, state, sites)
    artifacts = ui.artifacts_of(api, run.flow_run_id)
    ui.check_summary(
        page, f"{ui_url}/artifacts/artifact/{artifacts['site-pipeline-summary']}", site_rows(run)
    )
    for key in ("site-pipeline-failures", "site-pipeline-health"):
        url = f"{ui_url}/artifacts/artifact/{artifacts[key]}"
        assert ui.unreadable_symbols(page, url, "fail-b") == [], key
    ui.check_concurrency(page, ui_url, ["site-pipeline", f"site-pipeline:{GROUP}"])


def test_a_second_run_on_the_reused_server_links_to_working_pages(second: Run, page: Page) -> None:
    """The same checks on the second run, which reused the server: its printed link, its
    artifacts, the limits."""
    assert second.link == f"{second.ui}/runs/flow-run/{second.flow_run_id}"
    check_every_page(page, second.ui, second, NAMES[:2])


def test_server_start_after_the_idle_stop_brings_back_both_runs(
    first: Run, second: Run, on_demand: str, page: Page
) -> None:
    """The history is back, at the same address as before (4200, or else the port this home
    used last): the same checks on the first run, and the second run's page."""
    assert on_demand == first.ui
    check_every_page(page, on_demand, first, NAMES)
    name, state = ui.flow_run_facts(f"{on_demand}/api", second.flow_run_id)
    ui.check_flow_run(page, second.link, name, state, NAMES[:2])
