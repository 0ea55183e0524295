"""What `site-pipeline run` shows: log lines by verbosity, a live view on a terminal, tables.

On a terminal, a rich live view stays at the bottom: a progress bar (done/total, succeeded,
failed and timed-out counts, ETA) and the sites running now with how long each has run. Log
lines print above it, through the same console, so they never break it. Elsewhere (CI, cron,
a pipe) the same log lines print plainly, with no escape codes and no live view.

Which log lines, by verbosity:
- `normal`: the lifecycle (a site started, succeeded, failed with its reason and what
  happens next, retries, timeouts), the flow's own lines, and every other warning and error;
  not Prefect's own per-task-run lines (they repeat the lifecycle), unless one carries a
  traceback, which means a bug;
- `verbose`: also every line the pipelines print, and Prefect's own lines;
- `quiet`: warnings and errors only.
The task run's logs in the UI always get everything: this only decides the console.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from flows.names import PIPELINE_OUTPUT, PROGRESS, SITE_EVENT

Verbosity = Literal["quiet", "normal", "verbose"]


class LiveView:
    """The bottom of the screen while a run goes on: a progress bar and the running sites."""

    def __init__(self, console: Console, total: int) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}
        self._waiting: dict[str, str] = {}  # site -> why it waits long for a slot
        self._counts = {"succeeded": 0, "failed": 0, "timed_out": 0}
        self._progress = Progress(
            TextColumn("[bold]sites"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"),
            TextColumn("{task.fields[counts]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._bar = self._progress.add_task("sites", total=total, counts=self._count_text())
        self._live = Live(self, console=console, refresh_per_second=4, transient=True)

    def _count_text(self) -> str:
        c = self._counts
        return f"{c['succeeded']} ok, {c['failed']} failed, {c['timed_out']} timed out"

    def __rich__(self) -> RenderableType:
        with self._lock:
            running = sorted(self._running.items(), key=lambda item: item[1])
        now = time.monotonic()
        lines = [self._progress.get_renderable()]
        if running:
            shown = ", ".join(f"{site} {now - since:.0f}s" for site, since in running[:8])
            more = f" and {len(running) - 8} more" if len(running) > 8 else ""
            lines.append(Text(f"running: {shown}{more}", overflow="ellipsis", no_wrap=True))
        with self._lock:
            waiting = list(self._waiting.items())
        if waiting:
            sites = ", ".join(site for site, _ in waiting[:8])
            more = f" and {len(waiting) - 8} more" if len(waiting) > 8 else ""
            why = waiting[-1][1]
            text = f"waiting: {sites}{more}: {why}"
            lines.append(Text(text, overflow="ellipsis", no_wrap=True))
        return Group(*lines)

    def site_event(self, site: str, event: str, message: str = "") -> None:
        """A lifecycle event of `site` from its task run's log (in this process only)."""
        with self._lock:
            if event == "waiting":  # a long wait for a slot, and who holds the cap
                self._waiting[site] = message.split(": ", 1)[-1]
                return
            self._waiting.pop(site, None)
            if event == "started":
                self._running[site] = time.monotonic()
                return
            self._running.pop(site, None)
            if event in self._counts:  # a final outcome
                self._counts[event] += 1
        self._progress.update(self._bar, counts=self._count_text())

    def site_done(self, done: int, total: int, failed: int) -> None:
        """`on_progress`: a site reached its final outcome."""
        with self._lock:
            if sum(self._counts.values()) < done:  # no events here (Dask): count from these
                self._counts["failed"] = failed - self._counts["timed_out"]
                self._counts["succeeded"] = done - failed
        self._progress.update(self._bar, completed=done, counts=self._count_text())

    def __enter__(self) -> LiveView:
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.__exit__(None, None, None)


class ConsoleLogHandler(logging.Handler):
    """Print run log records on `console` by verbosity, and feed the live view's events."""

    def __init__(self, console: Console, verbosity: Verbosity, view: LiveView | None) -> None:
        super().__init__()
        self._console = console
        self._verbosity = verbosity
        self._view = view

    def wanted(self, record: logging.LogRecord) -> bool:
        if self._verbosity == "verbose":
            return True
        if getattr(record, PIPELINE_OUTPUT, False):
            return False
        if getattr(record, SITE_EVENT, None) is not None:  # our lifecycle lines
            return self._verbosity == "normal" or record.levelno >= logging.WARNING
        if record.name.startswith("prefect.task_runs"):
            # Prefect's own lines about a task run repeat our lifecycle lines; show one only
            # when it carries a traceback: a real bug (a site failure has none).
            return record.exc_info is not None
        if getattr(record, PROGRESS, False):
            return self._view is None and self._verbosity == "normal"
        if self._verbosity == "quiet" or record.levelno >= logging.WARNING:
            return record.levelno >= logging.WARNING
        return record.name.startswith("prefect.flow_runs")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, SITE_EVENT, None)
            site = getattr(record, "task_run_name", None)
            if self._view is not None and event and site:
                self._view.site_event(site, event, record.getMessage())
            if self.wanted(record):
                self._console.print(
                    Text(self.format(record)), soft_wrap=True, highlight=False, markup=False
                )
        except Exception:
            self.handleError(record)


class _Format(logging.Formatter):
    """`12:09:33 | ERROR   | fail-b | attempt 2/2 failed: exit code 3; no retries left`."""

    def format(self, record: logging.LogRecord) -> str:
        who = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} | {record.levelname:<7} | {who or record.name} | {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return f"{text}\n{record.exc_text}" if record.exc_text else text


@contextmanager
def run_console(total: int, verbosity: Verbosity, console: Console) -> Iterator[LiveView | None]:
    """For the duration of a run: our handler instead of Prefect's console handler on the
    root logger, and a live view when `console` is a terminal (and not quiet)."""
    view = LiveView(console, total) if console.is_terminal and verbosity != "quiet" else None
    handler = ConsoleLogHandler(console, verbosity, view)
    handler.setFormatter(_Format())
    handler.setLevel(logging.DEBUG if verbosity == "verbose" else logging.INFO)
    from prefect.logging.handlers import PrefectConsoleHandler

    root = logging.getLogger()
    replaced = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    for old in replaced:
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        if view is None:
            yield None
        else:
            with view:
                yield view
    finally:
        root.removeHandler(handler)
        for old in replaced:
            root.addHandler(old)


SITE_MIN_WIDTH = 40  # a longer site name may be cut when the terminal is narrow
ERROR_MIN_WIDTH = 10
_FIXED_COLUMNS: tuple[tuple[str, Literal["left", "right"]], ...] = (
    ("site", "left"),
    ("status", "left"),
    ("attempts", "right"),
    ("exit", "right"),
    ("seconds", "right"),
)


def summary_table(summary: Mapping[str, Any], width: int | None = None) -> Table:
    """The final table: one row per site. The error (with its cause) is one line that takes
    the room the other columns leave of `width` (the console's), cut with an ellipsis; the
    other columns keep their width (a site name up to `SITE_MIN_WIDTH`)."""
    table = Table(title=None, show_edge=False, pad_edge=False)
    styles = {"succeeded": "green", "failed": "red", "timed_out": "yellow"}
    rows = [
        (
            str(s["site"]),
            str(s["status"]),
            str(s["attempts"]),
            "" if s["exit_code"] is None else str(s["exit_code"]),
            f"{s['duration_s']:.2f}",
        )
        for s in summary["sites"]
    ]
    widths = [
        min(SITE_MIN_WIDTH, max([len(name), *(len(row[at]) for row in rows)]))
        for at, (name, _) in enumerate(_FIXED_COLUMNS)
    ]
    for (name, justify), column_width in zip(_FIXED_COLUMNS, widths, strict=True):
        table.add_column(name, justify=justify, min_width=column_width)
    # Each column boundary takes 3 characters (" │ "); the table has no outer edge.
    room = None if width is None else max(ERROR_MIN_WIDTH, width - sum(widths) - 3 * len(widths))
    table.add_column("error", justify="left", min_width=ERROR_MIN_WIDTH, max_width=room)
    for row, s in zip(rows, summary["sites"], strict=True):
        error = " ".join((s["error"] or "").split())  # one line, whatever the pipeline printed
        table.add_row(
            row[0],
            Text(row[1], style=styles.get(row[1], "")),
            *row[2:],
            Text(error, no_wrap=True, overflow="ellipsis"),
        )
    return table


def rows_table(columns: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> Table:
    """A plain table with a title, for `history`."""
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table
