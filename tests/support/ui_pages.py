"""The Prefect UI as a person sees it: its pages opened in a real Chromium (Debian's, through
Playwright for Python's `executable_path`; Playwright's own browser download is never used),
with checks of what they show. Shared by tests/e2e/test_ui_browser.py and the screenshot script
(bench/ui_screenshots.py).

Prefect's UI is a single-page app: every check waits for the text it expects (or for the
UI's own "Can't connect" error, which fails the check at once), never for a set time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM_ARGS = [
    "--no-sandbox",  # as root, in a container
    "--disable-gpu",
    "--disable-background-networking",  # nothing but the pages we open
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
BROKEN = ("Can't connect", "Something went wrong")
"""What the UI shows when its API does not answer (its `/ui-settings` names a wrong URL)."""
WAIT_MS = 30_000
"""How long a page may take to show what a check waits for (a loaded 2-core machine)."""


class UiBroken(AssertionError):
    """A page showed the UI's own error instead of its content."""


def chromium_path() -> str | None:
    """Debian's Chromium (or $CHROMIUM), None when there is none."""
    for found in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if found and Path(found).exists():
            return found
    return None


def browser_missing() -> str | None:
    """Why no browser test can run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "no Chromium (apt-get install chromium, or set CHROMIUM to its path)"
    return None


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the pages; closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Browser, width: int = 1280, height: int = 900) -> Page:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(WAIT_MS)
    return page


def ui_of(api_url: str) -> str:
    """The UI's address of the server whose API is `api_url`."""
    return api_url.rstrip("/").removesuffix("/api")


def show(page: Page, url: str, expect: str) -> None:
    """Open `url` and wait until the page shows `expect`; `UiBroken` when it shows the UI's
    own error (its API does not answer) instead, or as well."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url)
    wanted = page.get_by_text(expect, exact=True).first
    try:
        page.get_by_text(BROKEN[0]).or_(wanted).first.wait_for()
    except PlaywrightTimeout:
        seen = " | ".join(page.inner_text("body").split("\n")[-6:])
        raise UiBroken(f"{url} did not show {expect!r} in {WAIT_MS / 1000:g} s: {seen}") from None
    assert_not_broken(page, url)


def assert_not_broken(page: Page, url: str) -> None:
    text = page.inner_text("body")
    for sign in BROKEN:
        if sign in text:
            line = next(ln for ln in text.splitlines() if sign in ln)
            raise UiBroken(f"{url} shows {line!r}")


def flow_run_facts(api_url: str, flow_run_id: str) -> tuple[str, str]:
    """The flow run's name and state name, from the API."""
    data = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).json()
    return str(data["name"]), str(data["state"]["name"])


def artifacts_of(api_url: str, flow_run_id: str) -> dict[str, str]:
    """The flow run's artifacts: key -> id."""
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    found = httpx.post(f"{api_url}/artifacts/filter", json=body, timeout=30).json()
    return {str(a["key"]): str(a["id"]) for a in found if a.get("key")}


def check_flow_run(page: Page, link: str, name: str, state: str, sites: Sequence[str]) -> None:
    """The flow run's page at `link` shows its name and state, and its Task Runs tab one task
    run per site, named after it."""
    show(page, link, name)
    page.get_by_text(state, exact=True).first.wait_for()
    page.get_by_text("Task Runs", exact=True).last.click()
    page.get_by_text(f"{len(sites)} Task runs", exact=True).last.wait_for()
    for site in sites:
        page.get_by_text(site, exact=True).first.wait_for()
    assert_not_broken(page, link)


def check_summary(page: Page, url: str, rows: Mapping[str, Sequence[str]]) -> None:
    """The summary artifact's table at `url` has a row per site with each of its texts (its
    status, its cause)."""
    show(page, url, "site-pipeline-summary")
    for site, texts in rows.items():
        row = page.locator("tr", has=page.get_by_text(site, exact=True)).first
        row.wait_for()
        seen = row.inner_text()
        missing = [text for text in texts if text not in seen]
        assert not missing, f"{url}: the row of {site} lacks {missing}: {seen!r}"
    assert_not_broken(page, url)


_DRAWN_AS_MISSING = """([chars, font]) => {
  const draw = (c) => {
    const canvas = document.createElement('canvas');
    canvas.width = 64; canvas.height = 64;
    const ctx = canvas.getContext('2d');
    ctx.font = font; ctx.textBaseline = 'top'; ctx.fillStyle = '#000';
    ctx.fillText(c, 4, 4);
    return canvas.toDataURL();
  };
  const missing = new Set(['\\u{10FFFD}', '\\u{E0FFF}', '\\uFFFF'].map(draw));
  return chars.filter((c) => missing.has(draw(c)));
}"""


def unreadable_symbols(page: Page, url: str, expect: str) -> list[str]:
    """The characters beyond ASCII on the page at `url` (once it shows `expect`) that no
    font the page can use has (`symbols_not_drawn`)."""
    show(page, url, expect)
    return symbols_not_drawn(page)


def symbols_not_drawn(page: Page) -> list[str]:
    """The characters beyond ASCII in the page's main text that come out, drawn in its own
    font, as a code point that no font has (an empty box)."""
    where = "main" if page.locator("main").count() else "body"
    text = page.inner_text(where)
    symbols = sorted({char for char in text if ord(char) > 127 and not char.isspace()})
    font = page.evaluate(f"getComputedStyle(document.querySelector('{where}')).font")
    missing: list[str] = page.evaluate(_DRAWN_AS_MISSING, [symbols, font])
    return missing


def check_concurrency(page: Page, ui: str, limits: Sequence[str]) -> None:
    """The Concurrency page lists each of `limits` (global concurrency limits)."""
    show(page, f"{ui}/concurrency-limits", limits[0])
    for name in limits:
        page.get_by_text(name, exact=True).first.wait_for()
    assert_not_broken(page, f"{ui}/concurrency-limits")


def break_ui_api_url(page: Page, wrong: str = "http://127.0.0.1:9/api") -> None:
    """From now on this page's UI is told to call `wrong` (its `/ui-settings` rewritten on
    the way): what a server whose UI API URL is wrong serves."""

    def rewrite(route: Any) -> None:
        answer = route.fetch()
        route.fulfill(response=answer, json={**answer.json(), "api_url": wrong})

    page.route("**/ui-settings", rewrite)
