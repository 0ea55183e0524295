"""The soak night (issue 23): many sites, many faults mixed, on a PostgreSQL server; what a long
night does to the counts, the processes, the slots and the flow process's memory.

    python bench/soak.py                          # 2,000 sites at cap 16, then 500 on Dask
    python bench/soak.py --runners postgres --sites 200     # a quick look (about a minute)
    python bench/soak.py --write BENCHMARKS.md    # the results between the soak markers

Each row is one real `site-pipeline run` (a subprocess, `--summary-json`) against `prefect
server start` on a fresh PostgreSQL database; the `dask` row runs the same night (500 sites by
default) with `task_runner: {kind: dask, n_workers: 2}`. One pipeline, `bench/soak_site.py`,
plays each site's fault from a plan drawn with `--seed` (the counts are fixed, the positions
and the healthy sites' durations drawn; each fault at least once):

    fail_first 10 %   exits 1 on attempt 1, succeeds on the retry
    hang        2 %   a grandchild too, both run past the timeout (a line a second: not a stall)
    ignore_term 1 %   ignores SIGTERM and runs on: SIGKILL after kill_grace
    flood       1 %   prints 10 MB, then succeeds
    stall       1 %   prints nothing: the stall timeout stops it
    leave_bg    1 %   leaves a detached process (a session of its own) behind, and succeeds
    ok          rest  sleeps 0-2 s and succeeds

Settings: timeout 6 s, stall_timeout 3 s, kill_grace 2 s, retry_count 2, a fixed 0.5 s retry
delay. Why: the timeout must be well above the longest healthy site (2 s plus a loaded start)
so no healthy site times out on a busy machine, and the stall timeout below it so a staller is
told from a hang; two attempts are enough to show a retry that succeeds and a fault that comes
back; a short delay and grace keep 2,000 sites at a few minutes, since each hanging site holds
a slot for 2 x 6 s and each SIGTERM-ignoring one for 2 x (6 + 2) s.

The checks, each from what the pipelines recorded or what the system shows, not from our
summary (exit status 1, naming the failed checks):

- **lost** = sites with no attempt record; **twice** = sites with more attempts recorded than
  the summary's `attempts`, or an attempt started after one that succeeded. Both 0.
- **left**: processes whose argv or environment names the row's folder (each pipeline's
  `$SOAK_PLAN`, the flow's `$PREFECT_HOME` and config) a few seconds after the run exited:
  pipelines, grandchildren, the background processes the 1 % left (the product stops what a
  pipeline left behind; their pids are in the records, each checked too), the flow's other
  processes (Dask workers); at the end, the servers' processes (the work folder). All 0.
- **memory**: the flow process with its children that are not pipelines (Dask workers, the
  reaper): RSS, threads and open descriptors summed, sampled when 25, 50, 75 and 100 % of the
  sites have started (from the record files); RSS may grow at most 20 % from the first sample
  to the last (threads and descriptors are reported).
- **slots**: the concurrency limit's `active_slots` after the run, read with Prefect's client: 0.
- **mix**: each site's status and attempts in the summary are what its fault should give
  (timed_out after 2 attempts for hang, ignore_term and stall; succeeded otherwise, after 2
  attempts for fail_first).

Reported, not checked: wall (command start to exit) and work span (first attempt start to
last attempt end; a stopped attempt ends at its start plus its limit) against the ideal,

    ideal = max(sum of the sites' planned busy time / cap, longest site),

with a site's planned busy time its sleep (`ok`; `leave_bg`: at least 1.5 s; `flood`: 0, its
write only), a tenth of it plus it (`fail_first`), 2 x timeout (`hang`), 2 x (timeout +
kill_grace) (`ignore_term`), 2 x stall_timeout (`stall`); the longest site adds the retry
delay. The ideal has no process start-up, no flood write time and no Prefect overhead; wall
includes the flow's start and end. "same order" is the night with no overhead at all in the
order the sites really started (`same_order_seconds`): the ideal leaves out the tail that a
long site late in that order makes. On a fresh history the product starts the sites in list
order; a row after another on the same server finds history for some of its sites (the
names repeat where the same fault drew the same place) and starts the others first. And the
peak RSS per fault kind, from the summary's `peak_rss_mb` per site ("n/a" when the summary
has none).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.cap import write_between_markers  # noqa: E402
from tests.support.servers import (  # noqa: E402
    postgres_database,
    postgres_problem,
    prefect_env,
    prefect_server,
)

SITE = ROOT / "bench" / "soak_site.py"
BIN = Path(sys.executable).parent
START, END = "<!-- bench:soak -->", "<!-- /bench:soak -->"

TIMEOUT_S = 6.0
STALL_S = 3.0
KILL_GRACE_S = 2.0
RETRIES = 2  # total attempts
RETRY_DELAY_S = 0.5
TAG = "soak"
MAX_RSS_GROWTH = 0.20
QUARTERS = (0.25, 0.5, 0.75, 1.0)

FAULTS: dict[str, float] = {
    "fail_first": 0.10,
    "hang": 0.02,
    "ignore_term": 0.01,
    "flood": 0.01,
    "stall": 0.01,
    "leave_bg": 0.01,
}
KINDS = ("ok", *FAULTS)
EXPECTED: dict[str, tuple[str, int]] = {  # kind -> (status, attempts) in the summary
    "ok": ("succeeded", 1),
    "fail_first": ("succeeded", 2),
    "hang": ("timed_out", RETRIES),
    "ignore_term": ("timed_out", RETRIES),
    "flood": ("succeeded", 1),
    "stall": ("timed_out", RETRIES),
    "leave_bg": ("succeeded", 1),
}


def say(text: str) -> None:
    print(text, flush=True)


def draw_plan(n: int, seed: int) -> dict[str, dict[str, Any]]:
    """`{site: {"kind", "seconds"}}` in list order: each fault's share of n (at least one of
    each), the rest `ok`, shuffled with `seed`; seconds uniform in 0-2 s."""
    draw = random.Random(seed)  # noqa: S311 - a workload, not a secret
    kinds = [kind for kind, share in FAULTS.items() for _ in range(max(1, round(n * share)))]
    if len(kinds) > n:
        raise SystemExit(f"--sites {n}: at least {len(kinds)} needed for one of each fault")
    kinds += ["ok"] * (n - len(kinds))
    draw.shuffle(kinds)
    return {
        f"s{i:04d}-{kind}": {"kind": kind, "seconds": round(draw.uniform(0, 2), 3)}
        for i, kind in enumerate(kinds)
    }


def busy_seconds(kind: str, seconds: float) -> float:
    """The slot time a site's fault plans to take, retry delay left out (it holds no slot)."""
    if kind == "fail_first":
        return seconds / 10 + seconds
    if kind == "hang":
        return RETRIES * TIMEOUT_S
    if kind == "ignore_term":
        return RETRIES * (TIMEOUT_S + KILL_GRACE_S)
    if kind == "stall":
        return RETRIES * STALL_S
    if kind == "leave_bg":
        return max(1.5, seconds)
    if kind == "flood":
        return 0.0  # only its write, which the ideal leaves out
    return seconds


def attempt_seconds(kind: str, seconds: float) -> list[float]:
    """The slot time of each attempt a site's fault plans (`busy_seconds`, attempt by
    attempt)."""
    if kind == "fail_first":
        return [seconds / 10, seconds]
    if kind in ("hang", "ignore_term", "stall"):
        return [busy_seconds(kind, seconds) / RETRIES] * RETRIES
    return [busy_seconds(kind, seconds)]


def same_order_seconds(
    plan: Mapping[str, Mapping[str, Any]], cap: int, order: Sequence[str] | None = None
) -> float:
    """The night with no overhead at all, its sites started in `order` (default: the list's,
    the product's order on a fresh history): at most `cap` attempts at once, a free slot to
    the first site in that order with an attempt ready, a retried site's next attempt ready a
    retry delay after its last one ended. What `ideal_seconds` leaves out: a long site late
    in the order ends after the others, whatever the overhead."""
    sites = list(plan) if order is None else list(order)
    attempts = [attempt_seconds(plan[s]["kind"], float(plan[s]["seconds"])) for s in sites]
    free = [0.0] * cap  # when each slot is free, a heap
    later: list[tuple[float, int, int]] = [(0.0, i, 0) for i in range(len(attempts))]
    ready: list[tuple[int, int]] = []  # (site's place in the list, attempt), a heap
    end = 0.0
    while later or ready:
        now = heapq.heappop(free)
        if not ready and later[0][0] > now:
            now = later[0][0]  # the slot idles until the next attempt is ready
        while later and later[0][0] <= now:
            _, site, n = heapq.heappop(later)
            heapq.heappush(ready, (site, n))
        site, n = heapq.heappop(ready)
        done = now + attempts[site][n]
        end = max(end, done)
        if n + 1 < len(attempts[site]):
            heapq.heappush(later, (done + RETRY_DELAY_S, site, n + 1))
        heapq.heappush(free, done)
    return end


def ideal_seconds(plan: Mapping[str, Mapping[str, Any]], cap: int) -> float:
    """`max(sum of busy time / cap, longest site)`; a retried site's length adds the delay."""
    busy = {site: busy_seconds(p["kind"], float(p["seconds"])) for site, p in plan.items()}
    longest = max(
        busy[site] + (RETRY_DELAY_S if EXPECTED[p["kind"]][1] > 1 else 0.0)
        for site, p in plan.items()
    )
    return max(sum(busy.values()) / cap, longest)


@dataclass
class Attempt:
    site: str
    attempt: int
    pid: int
    kind: str
    start: float
    end: float | None = None
    exit: int | None = None
    children: list[tuple[int, bool]] = field(default_factory=list)  # (pid, detached)


def read_records(folder: Path) -> dict[str, list[Attempt]]:
    """Every attempt the pipelines recorded, per site, in start order."""
    found: dict[str, list[Attempt]] = defaultdict(list)
    for path in folder.glob("*.jsonl"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        head = lines[0]
        attempt = Attempt(
            head["site"], int(head["attempt"]), int(head["pid"]), head["kind"], head["start"]
        )
        for line in lines[1:]:
            if "child" in line:
                attempt.children.append((int(line["child"]), bool(line["detached"])))
            if "end" in line:
                attempt.end, attempt.exit = line["end"], int(line["exit"])
        found[attempt.site].append(attempt)
    for attempts in found.values():
        attempts.sort(key=lambda a: a.start)
    return dict(found)


def start_order(plan: Mapping[str, Any], records: Mapping[str, list[Attempt]]) -> list[str]:
    """The plan's sites in the order their first attempts started (a lost site last)."""
    first = {site: attempts[0].start for site, attempts in records.items() if attempts}
    return sorted(plan, key=lambda site: first.get(site, float("inf")))


def work_span(records: Mapping[str, list[Attempt]]) -> float | None:
    """First attempt start to last attempt end; an attempt that was stopped (no end line)
    ends at its start plus its limit (timeout, + kill grace if it ignores SIGTERM; stall)."""
    limit = {"hang": TIMEOUT_S, "ignore_term": TIMEOUT_S + KILL_GRACE_S, "stall": STALL_S}
    attempts = [a for site in records.values() for a in site]
    if not attempts:
        return None
    ends = [a.end if a.end is not None else a.start + limit.get(a.kind, 0.0) for a in attempts]
    return max(ends) - min(a.start for a in attempts)


def started_sites(folder: Path) -> int:
    """How many sites have started an attempt, from the record files' names alone."""
    return len({name.split("~", 1)[0] for name in os.listdir(folder)})


def lost_and_twice(
    plan: Mapping[str, Any], records: Mapping[str, list[Attempt]], summary: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """Sites with no record; sites run more often than the summary says, or again after an
    attempt that succeeded."""
    attempts_of = {s["site"]: int(s["attempts"]) for s in summary.get("sites", [])}
    lost = [site for site in plan if not records.get(site)]
    twice = []
    for site, attempts in records.items():
        succeeded_at = next((a.start for a in attempts if a.exit == 0), None)
        again = succeeded_at is not None and any(a.start > succeeded_at for a in attempts)
        if len(attempts) > attempts_of.get(site, 0) or again:
            twice.append(site)
    return lost, sorted(twice)


def mix_problems(plan: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]) -> list[str]:
    """Each site whose summary status or attempts differ from what its fault should give."""
    rows = {s["site"]: s for s in summary.get("sites", [])}
    problems = []
    for site, p in plan.items():
        status, attempts = EXPECTED[p["kind"]]
        row = rows.get(site)
        if row is None:
            problems.append(f"{site}: not in the summary")
        elif (row["status"], int(row["attempts"])) != (status, attempts):
            problems.append(
                f"{site}: {row['status']} after {row['attempts']} (expected {status} after "
                f"{attempts}): {row.get('error')}"
            )
    return problems


def marked(marker: str) -> list[psutil.Process]:
    """This user's processes (not this one nor its ancestors) whose argv or environment
    carries `marker`."""
    found = []
    me = psutil.Process()
    mine = {me.pid, *(parent.pid for parent in me.parents())}  # whoever started us too
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid in mine:
            continue
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()) or any(
                marker in value for value in proc.environ().values()
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def carries(pid: int, marker: str) -> bool:
    """Whether process `pid` is alive with `marker` in its argv (not a reused pid)."""
    try:
        return any(marker in part for part in psutil.Process(pid).cmdline())
    except psutil.Error:
        return False


def left_after(marker: str, patience: float = 5.0) -> list[psutil.Process]:
    """The processes still carrying `marker` after up to `patience` seconds (a stopped
    process group takes a moment to be reaped)."""
    deadline = time.monotonic() + patience
    while True:
        left = marked(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def describe(procs: Iterable[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            out.append(f"{proc.pid} (gone)")
    return out


@dataclass
class Sample:
    share: float
    at_s: float
    rss_mb: float
    threads: int
    fds: int
    processes: int
    flow_rss_mb: float = 0.0  # the flow process alone
    others: dict[str, float] = field(default_factory=dict)  # "pid name" -> MB, its children


def sample_flow(flow: psutil.Process, marker: str, share: float, t0: float) -> Sample | None:
    """The flow process and its descendants that are not pipelines (no `$SOAK_MARKER`, and not
    a fork about to exec one): RSS, threads and descriptors summed."""
    rss = threads = fds = count = 0
    flow_rss = 0
    others: dict[str, float] = {}
    try:
        family = [flow, *flow.children(recursive=True)]
    except psutil.Error:
        return None
    argv_of = {}
    for proc in family:
        try:
            argv_of[proc.pid] = proc.cmdline()
        except psutil.Error:
            continue
    for proc in family:
        try:
            if proc is not flow and (
                proc.environ().get("SOAK_MARKER") == marker
                # a fork that has not exec'd yet (its parent's argv): a pipeline being started
                or argv_of.get(proc.pid) == argv_of.get(proc.ppid())
            ):
                continue
            with proc.oneshot():
                own = proc.memory_info().rss
                threads += proc.num_threads()
                fds += proc.num_fds()
                if proc is flow:
                    flow_rss = own
                else:
                    others[f"{proc.pid} {proc.name()}"] = round(own / 2**20, 1)
            rss += own
            count += 1
        except psutil.Error:
            continue
    at = time.monotonic() - t0
    return Sample(share, at, rss / 2**20, threads, fds, count, flow_rss / 2**20, others)


def active_slots(url: str, name: str = TAG) -> int | None:
    """The concurrency limit's active slots on the server at `url`, with Prefect's client."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as c:
        return int(c.read_global_concurrency_limit_by_name(name).active_slots)


@dataclass
class Row:
    runner: str
    sites: int
    cap: int
    seed: int
    wall_s: float = 0.0
    span_s: float | None = None
    ideal_s: float = 0.0
    same_order_s: float = 0.0
    exit_code: int | None = None
    lost: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    background: int = 0  # background processes the leave_bg sites started
    background_left: int = 0  # of those, still running after the run
    slots_after: int | None = None
    samples: list[Sample] = field(default_factory=list)
    mix: list[str] = field(default_factory=list)
    per_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def rss_growth(self) -> float | None:
        if len(self.samples) < len(QUARTERS) or not self.samples[0].rss_mb:
            return None
        return self.samples[-1].rss_mb / self.samples[0].rss_mb - 1


def soak_config(
    folder: Path, plan: Mapping[str, Any], cap: int, marker: str, extra: Mapping[str, Any]
) -> Path:
    (folder / "records").mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps(plan))
    body: dict[str, Any] = {
        "sites": list(plan),
        "command": [
            *("{python}", "-I", "-S", str(SITE), "{site}"),
            *("--attempt", "{attempt}", "--marker", marker),
        ],
        "default_flags": [],
        "max_concurrent_sites": cap,
        "timeout": TIMEOUT_S,
        "stall_timeout": STALL_S,
        "kill_grace_seconds": KILL_GRACE_S,
        "retry_count": RETRIES,
        "retry_delay": RETRY_DELAY_S,
        "retry_jitter": 0,
        "concurrency_tag": TAG,
        "max_log_lines": 20,
        "async_settings": {"retry_backoff": "fixed"},
        "env": {
            "SOAK_PLAN": str(folder / "plan.json"),
            "SOAK_RECORDS": str(folder / "records"),
            "SOAK_MARKER": marker,
        },
        "output_dir": str(folder / "output"),
        **extra,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"pipeline": body}))
    return path


def night(
    runner: str,
    folder: Path,
    url: str,
    plan: Mapping[str, Mapping[str, Any]],
    cap: int,
    seed: int,
    extra: Mapping[str, Any],
) -> Row:
    """One soak night through the real CLI; sampled while it runs, checked after."""
    marker = f"soak-{uuid.uuid4().hex}"
    folder.mkdir(parents=True, exist_ok=True)
    config = soak_config(folder, plan, cap, marker, extra)
    summary_path = folder / "summary.json"
    records_dir = folder / "records"
    row = Row(runner, len(plan), cap, seed)
    row.ideal_s = ideal_seconds(plan, cap)
    argv = [str(BIN / "site-pipeline"), "run", "--config", str(config)]
    argv += ["--summary-json", str(summary_path)]
    t0 = time.monotonic()
    with (folder / "run.log").open("wb") as log:
        env = prefect_env(folder / "client", url)
        proc = psutil.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=log)
        pending = list(QUARTERS)
        while proc.poll() is None:
            share = started_sites(records_dir) / len(plan)
            while pending and share >= pending[0]:
                sample = sample_flow(proc, marker, pending.pop(0), t0)
                if sample:
                    row.samples.append(sample)
                    say(
                        f"  {runner}: {sample.share:.0%} started at {sample.at_s:.0f} s: "
                        f"{sample.rss_mb:.0f} MB (flow process {sample.flow_rss_mb:.0f}), "
                        f"{sample.threads} threads, {sample.fds} fds"
                    )
            time.sleep(0.25)
    row.wall_s = time.monotonic() - t0
    row.exit_code = proc.returncode
    # Everything of this row carries its folder: pipelines ($SOAK_PLAN), the flow and its
    # other processes ($PREFECT_HOME, the config's path).
    row.left = describe(left_after(str(folder)))
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    records = read_records(records_dir)
    row.lost, row.twice = lost_and_twice(plan, records, summary)
    row.span_s = work_span(records)
    row.same_order_s = same_order_seconds(plan, cap, start_order(plan, records))
    background = [
        pid for attempts in records.values() for a in attempts for pid, d in a.children if d
    ]
    row.background = len(background)
    row.background_left = sum(1 for pid in background if carries(pid, marker))
    row.slots_after = active_slots(url)
    row.mix = mix_problems(plan, summary)
    row.counts = dict(summary.get("counts", {}))
    row.per_kind = per_kind(plan, summary)
    row.failed = failed_checks(row)
    return row


def per_kind(
    plan: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per fault kind: sites, the summary's statuses, and the peak RSS (max and median of
    `peak_rss_mb`; None when the summary has none)."""
    rows = {s["site"]: s for s in summary.get("sites", [])}
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        sites = [site for site, p in plan.items() if p["kind"] == kind]
        statuses = Counter(rows[s]["status"] for s in sites if s in rows)
        peaks = [
            float(rows[s]["peak_rss_mb"])
            for s in sites
            if s in rows and rows[s].get("peak_rss_mb") is not None
        ]
        out[kind] = {
            "sites": len(sites),
            "statuses": dict(statuses),
            "peak_rss_max": max(peaks) if peaks else None,
            "peak_rss_median": median(peaks) if peaks else None,
        }
    return out


def failed_checks(row: Row) -> list[str]:
    """The checks this row failed, each with what was seen."""
    failed = []
    if row.lost:
        failed.append(f"lost: {len(row.lost)} sites with no record: {row.lost[:5]}")
    if row.twice:
        failed.append(f"twice: {len(row.twice)} sites run again: {row.twice[:5]}")
    if row.left:
        failed.append(f"left: {len(row.left)} processes after the run: {row.left[:5]}")
    if row.background_left:
        failed.append(f"background: {row.background_left} of {row.background} still running")
    if row.slots_after != 0:
        failed.append(f"slots: {row.slots_after} active slots after the run")
    growth = row.rss_growth()
    if growth is None:
        failed.append(f"memory: {len(row.samples)} of {len(QUARTERS)} samples taken")
    elif growth > MAX_RSS_GROWTH:
        failed.append(f"memory: RSS grew {growth:.0%} from the first quarter to the last")
    if row.mix:
        failed.append(f"mix: {len(row.mix)} sites not as their fault says: {row.mix[:3]}")
    return failed


def verdict(row: Row) -> str:
    """`pass`, or `FAIL: lost; memory` naming the failed checks."""
    failed = failed_checks(row)
    return "FAIL: " + "; ".join(f.split(":")[0] for f in failed) if failed else "pass"


def _trend(values: Sequence[float], unit: str = "") -> str:
    return " → ".join(f"{v:.0f}" for v in values) + unit if values else "-"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def report(rows: Sequence[Row], servers_left: list[str], command: str, work: Path) -> str:
    """The soak tables, as markdown."""
    lines = [
        f"### Soak: timeout {TIMEOUT_S:g} s, stall {STALL_S:g} s, kill grace {KILL_GRACE_S:g} s, "
        f"{RETRIES} attempts, retry delay {RETRY_DELAY_S:g} s",
        "",
        "| runner | sites | cap | wall s | work span s | ideal s | wall / ideal | span / ideal "
        "| same order s | wall / same order | lost | twice | left after "
        "| background stopped | slots after | flow RSS MB at 25/50/75/100 % (the flow "
        "process alone) | RSS growth "
        "| threads | fds | statuses as injected | checks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        growth = r.rss_growth()
        lines.append(
            f"| {r.runner} | {r.sites} | {r.cap} | {r.wall_s:.1f} | {_s(r.span_s)} | "
            f"{r.ideal_s:.1f} | {r.wall_s / r.ideal_s:.2f} | "
            f"{'-' if r.span_s is None else f'{r.span_s / r.ideal_s:.2f}'} | "
            f"{r.same_order_s:.1f} | {r.wall_s / r.same_order_s:.2f} | "
            f"{len(r.lost)} | {len(r.twice)} | {len(r.left)} | "
            f"{r.background - r.background_left} of {r.background} | {r.slots_after} | "
            f"{_trend([s.rss_mb for s in r.samples])} "
            f"({_trend([s.flow_rss_mb for s in r.samples])}) | "
            f"{'-' if growth is None else f'{growth:+.0%}'} | "
            f"{_trend([s.threads for s in r.samples])} | {_trend([s.fds for s in r.samples])} | "
            f"{'yes' if not r.mix else f'NO ({len(r.mix)})'} | {verdict(r)} |"
        )
    lines += [
        "",
        "| runner | fault | sites | expected | summary's statuses | peak RSS MB, max (median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for kind, info in r.per_kind.items():
            status, attempts = EXPECTED[kind]
            seen = ", ".join(f"{k} {v}" for k, v in sorted(info["statuses"].items())) or "-"
            peak = (
                "n/a"
                if info["peak_rss_max"] is None
                else f"{_mb(info['peak_rss_max'])} ({_mb(info['peak_rss_median'])})"
            )
            lines.append(
                f"| {r.runner} | {kind} | {info['sites']} | {status} after {attempts} | "
                f"{seen} | {peak} |"
            )
    lines += [
        "",
        f"Servers' processes left after they were stopped: {len(servers_left)}.",
        "",
        f"Produced by `{command}` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. "
        f"Logs: {work}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2000, help="sites of the PostgreSQL row")
    parser.add_argument("--dask-sites", type=int, default=500, help="sites of the Dask row")
    parser.add_argument("--cap", type=int, default=16)
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--runners", default="postgres,dask", help="postgres, dask, or both")
    parser.add_argument("--write", metavar="FILE", help="write the report (markdown) here")
    parser.add_argument("--json", metavar="FILE", help="write every row's numbers here")
    parser.add_argument("--work", metavar="DIR", help="logs and records here (default: a temp)")
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip the one-site run that warms the fresh server up (a smoke test's time)",
    )
    args = parser.parse_args(argv)
    runners = [r for r in args.runners.split(",") if r]
    unknown = sorted(set(runners) - {"postgres", "dask"})
    if unknown or not runners:
        parser.error(f"--runners: expected postgres and/or dask, got {args.runners!r}")
    for flag, value in (("--sites", args.sites), ("--dask-sites", args.dask_sites)):
        if value < len(FAULTS) + 1:
            parser.error(f"{flag}: expected at least {len(FAULTS) + 1}, got {value}")
    if args.cap < 1:
        parser.error(f"--cap: expected at least 1, got {args.cap}")
    problem = postgres_problem()
    if problem:
        print(f"bench/soak.py needs PostgreSQL: {problem}", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    command = "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[Row] = []
    with ExitStack() as servers:
        say("soak: starting prefect server on a fresh PostgreSQL database...")
        url = servers.enter_context(
            prefect_server(work / "server", servers.enter_context(postgres_database()))
        )
        if not args.no_warm_up:
            say("soak: warming up the server (one site)...")
            warm_plan = {"warm-up": {"kind": "ok", "seconds": 0}}
            night("warm-up", work / "warm-up", url, warm_plan, args.cap, 0, {})
        for runner in runners:
            n = args.sites if runner == "postgres" else args.dask_sites
            label = "server on PostgreSQL" if runner == "postgres" else "Dask (2 local workers)"
            extra = {"task_runner": {"kind": "dask", "n_workers": 2}} if runner == "dask" else {}
            say(f"soak: {n} sites, cap {args.cap}, {label}...")
            row = night(
                label, work / runner, url, draw_plan(n, args.seed), args.cap, args.seed, extra
            )
            rows.append(row)
            say(
                f"soak: {label}: wall {row.wall_s:.1f} s, ideal {row.ideal_s:.1f} s, "
                f"same order {row.same_order_s:.1f} s"
            )
    servers_left = describe(left_after(str(work), patience=10))
    text = report(rows, servers_left, command.strip(), work)
    print(text)
    if args.write:
        write_between_markers(Path(args.write), text, START, END)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": [asdict(r) for r in rows], "servers_left": servers_left}, indent=2)
        )
    failed = [f"{r.runner}: {f}" for r in rows for f in r.failed]
    failed += [f"servers: {len(servers_left)} processes left: {servers_left[:5]}"] * bool(
        servers_left
    )
    for line in failed:
        print(f"CHECK FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
