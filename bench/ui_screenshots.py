"""Screenshots of the Prefect UI after a demo night, for docs/ui.md.

    python bench/ui_screenshots.py [--out docs/images]

On a new PREFECT_HOME (a temporary folder) with no PREFECT_API_URL, as a new user runs it: two
runs of six demo sites (tests/support/fakes/fake_pipeline.py: one fails, one times out, one succeeds
on its retry, two share a group cap) on the kept local server, then Debian's Chromium
(tests/support/ui_pages.py) takes the pages a run links to: the flow run with its task runs, and
the summary and health artifacts (docs/images/ui-*.png). The server is stopped at the end.
Needs Chromium and Playwright for Python (the dev extra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.ops import local_server_files as lsfiles  # noqa: E402  (needs ROOT on sys.path)
from tests.support import ui_pages as ui  # noqa: E402
from tests.support.servers import seed_home  # noqa: E402

FAKE = ROOT / "tests" / "support" / "fakes" / "fake_pipeline.py"
SITES = [
    "shop.example",
    "news.example",
    "flaky-forum.example",  # fails its first attempt
    "fail-catalog.example",  # fails every attempt
    {"site": "hang-directory.example", "timeout": 3, "retry_count": 1},  # times out
    "blog.example",
]
GROUP = "example-host"


def write_config(folder: Path) -> Path:
    pipeline = {
        "sites": SITES,
        "command": ["{python}", str(FAKE), "--site", "{site}", "--attempt", "{attempt}"],
        "default_flags": [],
        "retry_count": 2,
        "retry_delay": 0,
        "retry_jitter": 0,
        "kill_grace_seconds": 1,
        "timeout": 60,
        "max_concurrent_sites": 3,
        "local_server_idle": 120,
        "groups": {GROUP: {"max_concurrent": 1, "match": r"^(shop|blog)\."}},
        "env": {"FAKE_SLEEP": "0.5"},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"pipeline": pipeline}), encoding="utf-8")
    return path


def run(env: dict[str, str], config: Path, folder: Path) -> str:
    """One `site-pipeline run`; its flow run id (the run exits 1: some sites fail)."""
    summary = folder / "summary.json"
    with open(folder / "runs.log", "ab") as log:
        subprocess.run(
            [sys.executable, "-m", "flows", "run", "--config", str(config), "--summary-json",
             str(summary)],
            cwd=folder, env=env, check=False, stdout=log, stderr=log,
        )  # fmt: skip
    return str(json.loads(summary.read_text(encoding="utf-8"))["flow_run_id"])


def screenshots(api_url: str, flow_run_id: str, out: Path) -> list[Path]:
    site = ui.ui_of(api_url)
    name, state = ui.flow_run_facts(api_url, flow_run_id)
    artifacts = ui.artifacts_of(api_url, flow_run_id)
    names = [entry if isinstance(entry, str) else entry["site"] for entry in SITES]
    made = []
    with ui.chromium() as browser:
        page = ui.new_page(browser, width=1600, height=860)
        ui.check_flow_run(page, f"{site}/runs/flow-run/{flow_run_id}", name, state, names)
        made.append(out / "ui-flow-run.png")
        page.screenshot(path=made[-1])
        summary = f"{site}/artifacts/artifact/{artifacts['site-pipeline-summary']}"
        ui.show(page, summary, "site-pipeline-summary")
        page.get_by_text("fail-catalog.example", exact=True).first.wait_for()
        made.append(out / "ui-summary.png")
        page.screenshot(path=made[-1])
        health = f"{site}/artifacts/artifact/{artifacts['site-pipeline-health']}"
        ui.show(page, health, "hang-directory.example")
        made.append(out / "ui-health.png")
        page.screenshot(path=made[-1])
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    missing = ui.browser_missing()
    if missing:
        print(f"ui_screenshots: {missing}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="site-pipeline-ui-"))
    home = seed_home(folder / "home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(ROOT))
    config = write_config(folder)
    try:
        run(env, config, folder)
        flow_run_id = run(env, config, folder)  # the second: the health strip has history
        state = lsfiles.read_state(home)
        if state is None:
            print("ui_screenshots: no kept server after the runs", file=sys.stderr)
            return 1
        for path in screenshots(state.url, flow_run_id, args.out):
            print(path)
    finally:
        subprocess.run(
            [sys.executable, "-m", "flows", "server", "stop"], env=env, cwd=folder, check=False
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
