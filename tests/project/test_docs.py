"""The README and docs/ stay true: links resolve, every page is reachable, the README stays
short, its quickstart is the three commands, and every command and option it names exists.

The CLI is asked through `python -m flows <command> --help` in a subprocess, not through its
internals, so these tests hold whatever shape the CLI's modules take. All but the last are
fast and need no server; the last runs the quickstart's `site-pipeline run` for real.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import keepers_under, run_tied, tie_keepers

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 230
QUICKSTART = ['pip install -e ".[dev]"', "site-pipeline run", "pytest"]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
COMMAND = re.compile(r"(?:^|[\s=])(?:site-pipeline|python -m flows)[ \t]+([a-z][\w-]*|\.\.\.)")
REPO_PATH = re.compile(r"((?:flows|tests|bench|examples|docs|\.ci)/[\w./-]*)(?::\w+)?$")
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def _prose(text: str) -> str:
    """The markdown without fenced blocks and code spans: where links and headings live."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(page: Path) -> list[str]:
    """The links of a page that point inside the repository (not URLs, not mail)."""
    links = LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


def _section(page: Path, title: str) -> str:
    """The text of a page's `## title` section, up to the next `## ` heading."""
    text = page.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page.name} has no '## {title}' section"
    return match.group(1)


def _table_commands() -> list[tuple[str, list[str]]]:
    """(command, options) for each command named in the README's commands table.

    The command is the word after `site-pipeline` or `python -m flows` in a code span of a
    row's first cell ("..." for the top-level command); the options are those in that span.
    """
    found: list[tuple[str, list[str]]] = []
    for line in _section(README, "Commands").splitlines():
        cells = re.split(r"(?<!\\)\|", line)
        if not line.startswith("|") or len(cells) < 3 or set(cells[1].strip()) <= {"-", ":"}:
            continue
        for span in CODE_SPAN.findall(cells[1]):
            match = COMMAND.search(span.strip("`"))
            if match:
                found.append((match.group(1), OPTION.findall(span[match.end() :])))
    return found


@functools.cache
def _help(command: str) -> subprocess.CompletedProcess[str]:
    """`python -m flows [command] --help`, run once per command from the project folder."""
    argv = [sys.executable, "-m", "flows", *([] if command == "..." else [command]), "--help"]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return run_tied(argv, cwd=ROOT, env=env, timeout=60)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page: Path) -> None:
    """Each relative link of README.md and docs/*.md names an existing file, and its
    #anchor, if any, names a heading of that file."""
    broken = []
    for link in _relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, f"{page.name}: {broken}"


def _named_paths(page: Path) -> list[str]:
    """The repository paths a page names in code spans (`flows/process/attempt.py`,
    `flows/site_pipeline.py:run_sites`); a bare `name.py` after one is its sibling."""
    paths = []
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        folder = ""
        for span in CODE_SPAN.findall(line):
            match = REPO_PATH.match(span.strip("`"))
            if match:
                paths.append(match.group(1))
                folder = match.group(1).rpartition("/")[0]
            elif folder and re.fullmatch(r"`[\w.]+\.py`", span):
                paths.append(f"{folder}/{span.strip('`')}")
    return paths


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_module_and_file_a_page_names_exists(page: Path) -> None:
    """A path like `flows/process/groups.py` in the text names a file that is there (a
    module that moved is renamed in the docs too)."""
    paths = _named_paths(page)
    assert [p for p in paths if not (ROOT / p).exists()] == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    """A page in docs/ that the README does not link to is a page nobody finds."""
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _relative_links(README)}
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p.name for p in pages if p.resolve() not in linked] == []
    assert (ROOT / "BENCHMARKS.md").resolve() in linked


def test_the_readme_is_short_enough_to_read_to_the_end() -> None:
    """The README stays a front page (about 200 lines); the reference lives in docs/."""
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md is {lines} lines"


def test_the_quickstart_is_exactly_install_run_and_test() -> None:
    """The quickstart's code block is the one install, one run and one test command."""
    block = re.search(r"^```bash\n(.*?)^```", _section(README, "Quickstart"), re.M | re.S)
    assert block, "the quickstart has no ```bash block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == QUICKSTART


def test_the_commands_table_names_every_command_of_the_cli() -> None:
    """Each command `site-pipeline --help` lists has a row in the README's table."""
    result = _help("...")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^ {4}([a-z][\w-]*) {2,}\S", result.stdout, re.M)
    assert listed, result.stdout
    named = {command for command, _ in _table_commands()}
    assert [c for c in listed if c not in named] == []


@pytest.mark.parametrize(
    ("command", "options"), _table_commands(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_command_and_option_of_the_commands_table_exists(
    command: str, options: list[str]
) -> None:
    """`python -m flows <command> --help` exits 0 and shows every option the row names."""
    result = _help(command)
    assert result.returncode == 0, result.stderr
    missing = [o for o in options if not re.search(rf"(?<![\w-]){o}(?![\w-])", result.stdout)]
    assert missing == [], f"{command} --help has no {missing}"


def _commands_in(page: Path) -> list[tuple[str, list[str]]]:
    """(command, options) of every `site-pipeline <command> ...` in a page's code: code
    spans, and lines of shell blocks (without their comments)."""
    text = page.read_text(encoding="utf-8")
    shell = [
        line.split("#", 1)[0]
        for block in re.findall(r"^```(?:bash|sh|powershell)\n(.*?)^```", text, re.M | re.S)
        for line in block.splitlines()
    ]
    found = []
    for snippet in [s.strip("`") for s in CODE_SPAN.findall(FENCE.sub("", text))] + shell:
        match = COMMAND.search(snippet)
        if match and match.group(1) != "...":
            found.append((match.group(1), OPTION.findall(snippet[match.end() :])))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_command_the_docs_show_exists_with_its_options(page: Path) -> None:
    """Every `site-pipeline <command> --option` written in the README or docs/ is a command
    of the CLI, and each option is in that command's --help."""
    wrong = []
    for command, options in _commands_in(page):
        result = _help(command)
        if result.returncode != 0:
            wrong.append(f"site-pipeline {command}: exit {result.returncode}")
            continue
        wrong += [
            f"site-pipeline {command} {o}"
            for o in options
            if not re.search(rf"(?<![\w-]){o}(?![\w-])", result.stdout)
        ]
    assert wrong == [], f"{page.name}: {wrong}"


@pytest.mark.slow
def test_the_quickstart_run_succeeds_on_the_shipped_config(tmp_path: Path) -> None:
    """`site-pipeline run` on the shipped config and demo pipeline, on the embedded default
    (the local server it starts and keeps), exits 0 with every site succeeded; `site-pipeline
    server stop` then stops that server and its keeper."""
    project = tmp_path / "project"
    (project / "examples").mkdir(parents=True)
    shutil.copy(ROOT / "config.yaml", project / "config.yaml")
    shutil.copy(ROOT / "examples" / "demo_site.py", project / "examples" / "demo_site.py")
    script = shutil.which("site-pipeline", path=str(Path(sys.executable).parent))
    assert script, "the site-pipeline script is not installed next to this interpreter"
    unset = {"PREFECT_API_URL", "SITE_PIPELINE_CONFIG"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    summary = tmp_path / "summary.json"
    result = run_tied([script, "run", "--summary-json", str(summary)], cwd=project, env=env)
    tie_keepers(tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    counts = json.loads(summary.read_text())["counts"]
    assert counts["succeeded"] == counts["total"] >= 3
    # As the Quickstart says: the run kept its local server; `server stop` stops it.
    assert "started a local Prefect server at" in result.stderr, result.stderr[-2000:]
    stopped = run_tied([script, "server", "stop"], cwd=project, env=env)
    assert "stopped the local Prefect server" in stopped.stdout, stopped.stdout + stopped.stderr
    assert keepers_under(tmp_path) == []


def test_the_house_map_lists_every_module_once_with_tests_that_exist() -> None:
    """docs/architecture.md's house map matches the tree: one row per module of `flows/`,
    none for a module that is gone, and each test file a row names is there."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(flows/[\w/]+\.py)` \|[^|]*\|([^|]*)\|$", text, re.M)
    listed = [module for module, _ in rows]
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "flows").rglob("*.py"))
    assert sorted(listed) == modules
    assert len(set(listed)) == len(listed)
    named = {name for _, tests in rows for name in re.findall(r"(?:\w+/)?test_\w+\.py", tests)}
    assert [name for name in sorted(named) if not (ROOT / "tests" / name).exists()] == []
    assert all(re.search(r"test_\w+\.py", tests) for _, tests in rows), "a module with no test"
