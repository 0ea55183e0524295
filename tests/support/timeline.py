"""Timelines written by the fake and benchmark pipelines: `<site>\\t<start|end>\\t<time>` lines.

Shared by the tests and `bench/cap.py`; imports nothing from Prefect.
"""

from __future__ import annotations

from pathlib import Path

Row = tuple[str, str, float]


def read_timeline(path: Path) -> list[Row]:
    """(site, 'start'|'end', time) rows of a timeline file, in time order."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        site, what, when = line.split("\t")
        rows.append((site, what, float(when)))
    return sorted(rows, key=lambda row: row[2])


def max_overlap(rows: list[Row]) -> int:
    """The most pipelines running at the same moment, from start/end rows."""
    running = peak = 0
    # At equal times, count ends first so back-to-back runs don't look overlapped.
    for _, what, _ in sorted(rows, key=lambda row: (row[2], row[1] == "start")):
        running += 1 if what == "start" else -1
        peak = max(peak, running)
    return peak
