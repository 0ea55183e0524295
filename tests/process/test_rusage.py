"""What an attempt's process tree costs (peak RSS, CPU seconds) and `memory_limit`: real
processes (`tests/support/fakes/hog.py`), no Prefect. Every test runs on both process-control
backends, `group` and `tree`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.process import job_object, rusage
from flows.process import trees as proctree
from flows.process.attempt import AttemptOutcome, cost, run_attempt
from flows.process.control import ProcessControl, control_for
from flows.process.trees import TreeUsage
from tests.conftest import ROOT
from tests.support.processes import alive, run_tied

HOG = Path(__file__).resolve().parents[1] / "support" / "fakes" / "hog.py"
OVER = re.compile(r"^over memory: (\d+) MB > 200 MB$")


@pytest.fixture(params=["group", "tree"])
def control(request: pytest.FixtureRequest) -> ProcessControl:
    """The process-control backend every attempt of a test runs with."""
    return control_for(request.param)


def hog(site: str, *options: object) -> list[str]:
    return [sys.executable, str(HOG), "--site", site, *(str(option) for option in options)]


def run(argv: list[str], tmp_path: Path, control: ProcessControl, **more: object) -> AttemptOutcome:
    env = {**os.environ, "HOG_PIDS_DIR": str(tmp_path)}
    options: dict[str, object] = {"timeout": 60, "kill_grace": 0.5, **more}
    return run_attempt(
        argv,
        cwd=tmp_path,
        env=env,
        log=lambda _: None,
        control=control,
        **options,  # type: ignore[arg-type]
    )


def tree_pids(folder: Path) -> list[int]:
    """The pids (pipeline, child) that the hog wrote once both held their memory."""
    return [int(pid) for path in folder.glob("*.pids") for pid in path.read_text().split()]


def test_a_tree_over_its_memory_limit_is_stopped_and_nothing_is_left(
    tmp_path: Path, control: ProcessControl
) -> None:
    """The pipeline takes 120 MB and its child 120 MB, each under the 200 MB limit alone
    (an under-limit run of 120 MB is the next test): the tree's sum passes it at a sample,
    so the attempt is stopped long before its 60 s timeout, by SIGTERM, status `timed_out`,
    error `over memory: N MB > 200 MB` with N the sampled sum (above 200), and neither
    process is left."""
    started = time.monotonic()
    outcome = run(
        hog("tree-hog", "--mb", 120, "--child-mb", 120, "--hold", 60),
        tmp_path,
        control,
        memory_limit=200.0,  # said as `200 MB`, as YAML's 200 is read
    )
    elapsed = time.monotonic() - started
    assert outcome.status == "timed_out", outcome.error
    match = OVER.match(outcome.error or "")
    assert match is not None, outcome.error
    assert 200 < int(match.group(1)) < 600
    assert outcome.exit_code == -15  # TERM, as a timeout
    assert outcome.ending == "over_memory"
    assert elapsed < 30
    pids = tree_pids(tmp_path)
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids)
    assert outcome.peak_rss_mb is not None and outcome.peak_rss_mb > 200


def test_a_pipeline_under_its_memory_limit_is_untouched(
    tmp_path: Path, control: ProcessControl
) -> None:
    """120 MB under a 200 MB limit: it runs to its end and succeeds, and its peak RSS is
    recorded (at least the 120 MB it held, below the limit)."""
    outcome = run(hog("under-hog", "--mb", 120, "--hold", 1), tmp_path, control, memory_limit=200)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.peak_rss_mb is not None and 110 <= outcome.peak_rss_mb <= 200


def test_without_a_memory_limit_a_big_tree_runs_to_its_end(
    tmp_path: Path, control: ProcessControl
) -> None:
    """memory_limit off (None, the default): the same 240 MB tree is not stopped, and its
    peak RSS is the sum of both processes."""
    outcome = run(hog("free-hog", "--mb", 120, "--child-mb", 120, "--hold", 1), tmp_path, control)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.peak_rss_mb is not None and outcome.peak_rss_mb >= 220


def test_a_tree_over_memory_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, control: ProcessControl
) -> None:
    """Over its limit and deaf to SIGTERM (both processes): stopped like a timeout, SIGKILL
    after kill_grace, and nothing is left."""
    outcome = run(
        hog("deaf-hog", "--mb", 120, "--child-mb", 120, "--hold", 60, "--ignore-term"),
        tmp_path,
        control,
        memory_limit=200,
        kill_grace=0.5,
    )
    assert OVER.match(outcome.error or ""), outcome.error
    assert outcome.exit_code == -9
    pids = tree_pids(tmp_path)
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def test_the_limit_is_said_as_it_was_given(tmp_path: Path, control: ProcessControl) -> None:
    """A limit of 100.5 MB: `over memory: N MB > 100.5 MB`, N a whole number."""
    outcome = run(hog("half-hog", "--mb", 150, "--hold", 60), tmp_path, control, memory_limit=100.5)
    assert re.fullmatch(r"over memory: \d+ MB > 100\.5 MB", outcome.error or ""), outcome.error


def test_the_peak_rss_of_a_pipeline_that_takes_100_mb_is_at_least_90_mb(
    tmp_path: Path, control: ProcessControl
) -> None:
    """A pipeline that holds ~100 MB for a second reports a peak of at least 90 MB (and not
    absurdly more: the interpreter is a few MB more)."""
    outcome = run(hog("rss-hog", "--mb", 100, "--hold", 1), tmp_path, control)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.peak_rss_mb is not None and 90 <= outcome.peak_rss_mb < 200


def test_cpu_seconds_count_a_burning_pipeline_and_not_a_sleeping_one(
    tmp_path: Path, control: ProcessControl
) -> None:
    """A pipeline that burns ~0.5 s of CPU reports cpu_s >= 0.3; one that only sleeps a
    second reports far less."""
    burning = run(hog("burn-hog", "--burn", 0.5, "--hold", 0.5), tmp_path, control)
    sleeping = run(hog("sleep-hog", "--hold", 1), tmp_path, control)
    assert burning.cpu_s is not None and 0.3 <= burning.cpu_s < 5
    assert sleeping.cpu_s is not None and sleeping.cpu_s < 0.3


def test_cpu_seconds_keep_a_child_that_already_ended(
    tmp_path: Path, control: ProcessControl
) -> None:
    """A child burns ~0.5 s of CPU and ends (its parent reaps it), then the pipeline sleeps
    a second: the child's CPU time counts, at its last sampled value."""
    outcome = run(hog("child-burn-hog", "--child-burn", 0.5, "--hold", 1), tmp_path, control)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.cpu_s is not None and outcome.cpu_s >= 0.3


def test_a_pipeline_that_burns_and_exits_at_once_is_counted_to_its_end(
    tmp_path: Path, control: ProcessControl
) -> None:
    """It burns ~0.5 s of CPU and exits at once: on both backends cpu_s holds all of the CPU
    time the pipeline says it used (the kernel's account of the reaped process, not a
    sample 0.2 s before its end)."""
    outcome = run(hog("exit-hog", "--burn", 0.5), tmp_path, control)
    assert outcome.status == "succeeded" and outcome.result is not None, outcome.error
    own = outcome.result["cpu_s"]
    assert outcome.cpu_s is not None and own >= 0.5
    assert outcome.cpu_s >= own - 0.02  # the kernel counts in ticks


# Shorter than a sample (POLL_SECONDS): only the kernel's account sees these.
SHORT_CHILD_120_MB = (
    "import subprocess, sys\n"
    "subprocess.run([sys.executable, '-c', "
    "'import time; b = b\"x\" * (120 << 20); time.sleep(0.05)'], check=True)\n"
)
BURN_0_4_S = "import time\nwhile time.process_time() < 0.4:\n    pass\n"

# A flow process that is small (no Prefect, no pytest): it runs one attempt, prints its cost.
SMALL_SPAWNER = """
import json, os, sys
from flows.process.attempt import run_attempt
from flows.process.control import control_for
outcome = run_attempt(
    sys.argv[2:], cwd=".", env=dict(os.environ), log=lambda _: None, timeout=60, kill_grace=0.5,
    control=control_for(sys.argv[1]),
)
print(json.dumps([outcome.status, outcome.peak_rss_mb, outcome.cpu_s]))
"""


# Linux carries a process's peak into what it execs (and a fork keeps it), so a spawner
# started by this pytest worker (hundreds of MB once it has run Prefect and Dask tests) has a
# peak above 120 MB and the tree's figure is unknowable (`Account.peak_known`). A spawner
# forked by a small launcher starts from the launcher's own small peak.
SMALL_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def cost_from_a_small_spawner(control: ProcessControl, argv: list[str]) -> tuple[float, float]:
    done = run_tied(
        [
            sys.executable,
            "-c",
            SMALL_LAUNCHER,
            sys.executable,
            "-c",
            SMALL_SPAWNER,
            control.name,
            *argv,
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    status, peak, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == "succeeded"
    return peak, cpu


def test_a_50_ms_child_holding_120_mb_reports_at_least_120_mb(control: ProcessControl) -> None:
    """A pipeline whose child takes 120 MB for 50 ms and ends (reaped by the pipeline)
    reports a peak of at least 120 MB: the kernel's account, not what a sample happened to
    see. (Run from a small flow process: Linux counts the spawner's own peak into a new
    program's figure, so only a figure above it is the tree's, `rusage.Account.peak_known`.)"""
    peak, _ = cost_from_a_small_spawner(control, [sys.executable, "-c", SHORT_CHILD_120_MB])
    assert peak is not None and peak >= 120


def test_a_bare_python_start_reports_a_true_figure_or_none(
    tmp_path: Path, control: ProcessControl
) -> None:
    """`python -c pass` lives a few ms, shorter than a sample: its peak is an interpreter's
    (>= 5 MB) where the kernel's figure is its own, else None, never the fraction of a MB a
    late sample saw; its CPU seconds are the kernel's (> 0)."""
    for peak, cpu in [
        cost_from_a_small_spawner(control, [sys.executable, "-c", "pass"]),
        (lambda o: (o.peak_rss_mb, o.cpu_s))(
            run([sys.executable, "-c", "pass"], tmp_path, control)
        ),
    ]:
        assert peak is None or peak >= 5, peak
        assert cpu is not None and cpu > 0


def test_0_4_s_of_cpu_reports_at_least_0_4_s(tmp_path: Path, control: ProcessControl) -> None:
    """A pipeline that burns 0.4 s of CPU and exits at once reports cpu_s >= 0.4."""
    outcome = run([sys.executable, "-c", BURN_0_4_S], tmp_path, control)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.cpu_s is not None and outcome.cpu_s >= 0.4


@pytest.mark.parametrize(
    ("sampled", "counted", "expected"),
    [
        # the kernel's own peak and CPU are above the samples': they win
        ((10, 100, 0.1, 5), (120, 2.0, 50), (120, 2.0)),
        # the samples saw more at once (a tree's sum) than the largest single process
        ((10, 300, 0.1, 5), (120, 2.0, 50), (300, 2.0)),
        # the kernel's peak is not above the spawner's: only the samples' counts
        ((10, 60, 0.1, 5), (230, 0.5, 230), (60, 0.5)),
        # the samples counted more CPU (a grandchild never reaped): theirs wins
        ((10, 60, 0.9, 5), (230, 0.5, 230), (60, 0.9)),
        # ... two live samples are enough for a peak ...
        ((10, 60, 0.1, 2), (230, 0.5, 230), (60, 0.5)),
        # ... and with fewer than two live samples, no peak is known at all
        ((0.6, 0.6, 0.0, 1), (230, 0.02, 230), (None, 0.02)),
        # nothing sampled: the kernel's peak where it is the tree's own, and its CPU
        (None, (120, 2.0, 50), (120, 2.0)),
        (None, (120, 0.5, 50), (120, 0.5)),
        # reaped by someone else (no account) on POSIX: CPU unknown, peak from the samples
        ((10, 60, 0.3, 5), None, (60, None)),
        (None, None, (None, None)),
    ],
)
def test_the_cost_takes_each_figure_where_it_is_known(
    sampled: tuple[float, float, float, int] | None,
    counted: tuple[float, float, float] | None,
    expected: tuple[float | None, float | None],
) -> None:
    """`cost`: the larger of the kernel's and the samples' figures, each only where it is
    known: the kernel's peak above the spawner's own, the samples' from two live samples."""
    usage = None if sampled is None else TreeUsage(*sampled[:3], seen_alive=int(sampled[3]))
    account = None if counted is None else rusage.Account(*counted)
    assert cost(usage, account) == expected


@pytest.mark.parametrize(
    ("sampled", "expected"),
    [((10, 60, 0.3, 5), (60, 0.3)), ((10, 60, 0.3, 1), (None, 0.3)), (None, (None, None))],
)
def test_without_the_kernel_s_account_the_cost_is_the_samples(
    sampled: tuple[float, float, float, int] | None,
    expected: tuple[float | None, float | None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the kernel keeps no account (`rusage.supported()` False: Windows without a job's
    count), the CPU is the samples' (their peak from two live samples, as on POSIX);
    nothing sampled is None, never 0."""
    monkeypatch.setattr(rusage, "supported", lambda: False)
    usage = None if sampled is None else TreeUsage(*sampled[:3], seen_alive=int(sampled[3]))
    assert cost(usage, None) == expected


def test_nothing_sampled_is_none(tmp_path: Path, control: ProcessControl) -> None:
    """A command that can't start has no usage (None, not 0)."""
    outcome = run([str(tmp_path / "no-such-command")], tmp_path, control)
    assert outcome.status == "not_started"
    assert (outcome.peak_rss_mb, outcome.cpu_s) == (None, None)


def test_watch_samples_the_tree_and_keeps_the_peak(control: ProcessControl) -> None:
    """`watch` gives the tree's RSS now, its peak so far and its CPU seconds; a process it
    does not track gives None."""
    proc = control.spawn(hog("watch-hog", "--mb", 60, "--hold", 1.5), cwd=".", env=os.environ)
    try:
        usage = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            usage = control.watch(proc)
            if usage is not None and usage.rss_mb >= 60:
                break
            time.sleep(0.05)
        assert usage is not None and usage.rss_mb >= 60
        assert usage.peak_rss_mb >= usage.rss_mb and usage.cpu_s >= 0
    finally:
        control.stop(proc, 0.5)
    untracked = subprocess.Popen([sys.executable, "-c", "pass"])
    untracked.wait()
    assert proctree.watch(untracked) is None


def test_a_job_object_s_counts_are_the_tree_s_cost() -> None:
    """Windows: the pipeline's Job Object counted 0.3 s user + 0.1 s kernel CPU (in 100 ns
    units) and a largest commit of 120 MB: the attempt's cost is (120 MB, 0.4 s), above what
    two small samples saw (the job never held the spawner's memory)."""
    basic = job_object._BasicAccounting(TotalUserTime=3_000_000, TotalKernelTime=1_000_000)
    extended = job_object._ExtendedLimits(PeakProcessMemoryUsed=120 * 2**20)
    account = job_object.job_account(basic, extended)
    assert account is not None and (account.peak_rss_mb, account.cpu_s) == (120.0, 0.4)
    assert cost(TreeUsage(10, 12, 0.05, seen_alive=2), account) == (120.0, 0.4)


@pytest.mark.parametrize(
    ("user", "peak_mb", "expected"),
    [
        (0, 0, (None, None)),  # Wine's jobs: CPU 0, peak 0: nothing is known
        (0, 120, (None, None)),  # a CPU of 0 for a tree that ran: the job did not count
        (4_000_000, 0, (None, 0.4)),  # a peak of 0 is not a peak: null, never 0 MB
    ],
)
def test_a_job_object_s_zero_is_unknown_never_zero(
    user: int, peak_mb: int, expected: tuple[float | None, float | None]
) -> None:
    """Honest Windows cost (issue 45): a figure the job gives as 0 for a tree that ran is
    null in the outcome, never 0 MB or 0 s (with nothing sampled to fall back on)."""
    basic = job_object._BasicAccounting(TotalUserTime=user, TotalProcesses=1)
    extended = job_object._ExtendedLimits(PeakProcessMemoryUsed=peak_mb * 2**20)
    assert cost(None, job_object.job_account(basic, extended)) == expected


def test_the_tree_backend_records_what_the_pipeline_s_own_job_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tree backend gives each pipeline a job of its own when it starts (`own_job`,
    with the pipeline's pid) and, once the tree has ended, closes it and makes what it
    counted the attempt's cost. (The Win32 calls themselves run only on Windows; here they
    are stand-ins that answer as a job would.)"""
    jobs: list[int] = []
    closed: list[int] = []
    counted = rusage.Account(peak_rss_mb=321.0, cpu_s=7.5)
    monkeypatch.setattr(job_object, "own_job", lambda pid: jobs.append(pid) or 1000 + pid)
    monkeypatch.setattr(job_object, "close_job", lambda job: closed.append(job) or counted)

    outcome = run([sys.executable, "-c", "pass"], tmp_path, control_for("tree"))

    assert outcome.status == "succeeded"
    assert len(jobs) == 1 and closed == [1000 + jobs[0]]
    assert (outcome.peak_rss_mb, outcome.cpu_s) == (321.0, 7.5)
