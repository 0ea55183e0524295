"""The benchmark script still runs (its numbers live in BENCHMARKS.md, not in tests), and
the heterogeneous night's workload, bounds and checks (`bench/night.py`) say what they claim."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import cap, night
from tests.conftest import PYTHON, ROOT
from tests.support.timeline import read_timeline


@pytest.mark.slow
def test_bench_script_measures_a_small_workload(tmp_path: Path) -> None:
    """bench/cap.py with the asyncio runner prints a table whose overlap respects the cap."""
    report = tmp_path / "report.md"
    result = subprocess.run(
        [
            PYTHON,
            "bench/cap.py",
            "--runners",
            "asyncio",
            "--n",
            "6",
            "--c",
            "2",
            "--t",
            "0.2",
            "--scale",
            "0",
            "--write",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    row = next(
        line for line in report.read_text().splitlines() if line.startswith("| plain asyncio")
    )
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4] == "2"  # max overlap equals the cap
    assert 0 < float(cells[3]) <= 1.0  # efficiency


def test_the_night_is_fixed_typical_and_scaled_to_its_bound() -> None:
    """The night is 40 fixed log-normal durations whose bound max(sum / 8, longest) is 60 s;
    its list order simulates to about 1.2x that bound and longest first to 1.0x."""
    durations = night.night_durations()
    assert durations == night.night_durations()  # the seed fixes it
    assert len(durations) == 40
    assert night.lower_bound(durations, 8) == pytest.approx(60, abs=0.01)
    longest = max(durations, key=lambda site: durations[site])
    assert list(durations).index(longest) >= 10  # long sites are not listed first
    listed = night.simulate(list(durations.values()), 8) / 60
    first = night.simulate(sorted(durations.values(), reverse=True), 8) / 60
    assert 1.15 <= listed <= 1.25
    assert first <= 1.01


def test_the_lower_bound_is_the_larger_of_the_share_and_the_longest_site() -> None:
    """lower_bound is sum / cap when the work dominates and the longest site when it does."""
    assert night.lower_bound({"a": 3, "b": 3, "c": 3, "d": 3}, 2) == 6
    assert night.lower_bound({"a": 10, "b": 1, "c": 1}, 2) == 10


def test_greedy_simulation_starts_each_site_on_the_first_free_slot() -> None:
    """simulate schedules in the given order: a long site listed last ends the night late."""
    assert night.simulate([1, 1, 4], 2) == 5
    assert night.simulate([4, 1, 1], 2) == 4


def test_the_group_ideal_is_bound_by_the_groups_caps() -> None:
    """The group row's ideal is max(sum / C, each group's sum / its cap, longest): 5 T for
    two groups of 5 at cap 1 and 10 free sites under a cap of 4; a group alone can bind."""
    workload = night.group_workload(2.0)
    assert len(workload) == 20
    assert list(workload)[:10] == [f"hosta-{i:02d}" for i in range(5)] + [
        f"hostb-{i:02d}" for i in range(5)
    ]
    assert night.group_ideal(workload, night.GROUPS, 4) == 10.0
    assert night.group_ideal(workload, night.GROUPS, 8) == 10.0  # the groups bind
    assert night.group_ideal(workload, {"hosta": 5, "hostb": 5}, 4) == 10.0  # the cap binds
    assert night.group_ideal(workload, {"hosta": 5, "hostb": 5}, 8) == 5.0
    assert night.group_config() == {
        "hosta": {"max_concurrent": 1, "match": "^hosta-"},
        "hostb": {"max_concurrent": 1, "match": "^hostb-"},
    }


def test_group_peaks_count_only_each_groups_own_sites() -> None:
    """group_peaks finds two hosta sites overlapping, and never counts free sites."""
    rows = [
        ("hosta-00", "start", 0.0),
        ("free-00", "start", 0.1),
        ("hosta-01", "start", 0.5),
        ("hosta-00", "end", 1.0),
        ("hostb-00", "start", 1.0),
        ("hosta-01", "end", 1.5),
        ("free-00", "end", 2.0),
        ("hostb-00", "end", 2.0),
    ]
    assert night.group_peaks(rows) == {"hosta": 2, "hostb": 1}


def test_sleep_site_sleeps_its_own_duration_from_the_file(tmp_path: Path) -> None:
    """sleep_site.py takes a site's seconds from $BENCH_DURATIONS' file, else $BENCH_SLEEP."""
    timeline = tmp_path / "timeline.tsv"
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps({"long": 0.4}))
    env = {**os.environ, "BENCH_TIMELINE": str(timeline), "BENCH_DURATIONS": str(durations)}
    for site in ("long", "other"):
        subprocess.run(
            [PYTHON, "-I", "-S", "bench/sleep_site.py", site],
            cwd=ROOT,
            env={**env, "BENCH_SLEEP": "0"},
            check=True,
            timeout=30,
        )
    rows = read_timeline(timeline)
    marks = {(site, what): when for site, what, when in rows}
    took = {site: marks[site, "end"] - marks[site, "start"] for site in ("long", "other")}
    assert took["long"] >= 0.4
    assert took["other"] < 0.3


def test_write_between_markers_keeps_the_prose_and_the_other_section(tmp_path: Path) -> None:
    """Writing the night section adds its markers once and leaves the cap section and the
    prose as they were; writing it again replaces only its own text."""
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\nprose\n\n{cap.START}\ncap table\n{cap.END}\n\nmore prose\n")
    cap.write_between_markers(doc, "night v1", cap.NIGHT_START, cap.NIGHT_END)
    cap.write_between_markers(doc, "night v2", cap.NIGHT_START, cap.NIGHT_END)
    text = doc.read_text()
    assert text == (
        f"# Benchmarks\n\nprose\n\n{cap.START}\ncap table\n{cap.END}\n\nmore prose\n\n"
        f"{cap.NIGHT_START}\nnight v2\n{cap.NIGHT_END}\n"
    )


@pytest.mark.slow
def test_bench_night_runs_on_a_small_scale(tmp_path: Path) -> None:
    """`--runners night` alone writes the night table (four rows, each at or under the cap,
    every site succeeded) and the group row, and nothing of the cap benchmark."""
    report = tmp_path / "report.md"
    result = subprocess.run(
        [
            *(PYTHON, "bench/cap.py", "--runners", "night", "--night-scale", "0.02"),
            *("--write", str(report)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = report.read_text()
    assert cap.START not in text
    rows = [line for line in text.splitlines() if line.startswith(("| site-pipeline", "| GNU"))]
    assert len(rows) == 5, text
    for row in rows[:4]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[4]) <= 8 and cells[5] == "yes", row
    group = [cell.strip() for cell in rows[4].strip("|").split("|")]
    assert int(group[3]) <= 4 and group[7] == "yes", rows[4]
