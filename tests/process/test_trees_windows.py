"""The tree backend on a real Windows CPython (issue 45): python.org's build under Wine in
.ci/run's Windows lane (.ci/windows-lane.sh), and windows-latest in
.github/workflows/windows.yml, with the same command.

Under Wine, Ctrl-Break always fails (there is no console to send it from), as it does on
Windows for a flow started by Task Scheduler "whether user is logged on or not", a service
or a detached process: every stop here goes through the fallback (the Job Object's
terminate, each process's kill), and must still end the attempt as usual and leave nothing.
Under Wine the Job Object counts no CPU and no peak (zeros): the outcome says null.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from flows.config import site_output_dir
from flows.ops import keeper
from flows.process import job_object
from flows.process import trees as proctree
from flows.process.attempt import AttemptOutcome, run_attempt
from flows.process.control import control_for, stop_everything
from flows.process.logfile import attempt_log_path
from tests.conftest import FAKE, ROOT, cli_in_process, write_config
from tests.support.processes import alive, hanging_pids, wait_until_gone

pytestmark = [
    pytest.mark.windows,
    pytest.mark.skipif(
        sys.platform != "win32",
        reason="Windows only: runs in .ci/run's Windows lane (Wine) and on windows-latest",
    ),
]

HOG = ROOT / "tests" / "support" / "fakes" / "hog.py"
GRACE = 30.0  # longer than any test here may take: a stop must not wait it out for nothing


def fake(site: str, attempt: int = 1) -> list[str]:
    return [sys.executable, str(FAKE), "--site", site, "--attempt", str(attempt)]


def attempt(argv: list[str], folder: Path, **more: object) -> AttemptOutcome:
    options: dict[str, object] = {"timeout": 60, "kill_grace": GRACE, **more}
    return run_attempt(
        argv,
        cwd=folder,
        env={**os.environ, "FAKE_PIDS_DIR": str(folder), "HOG_PIDS_DIR": str(folder)},
        log=lambda _: None,
        **options,  # type: ignore[arg-type]
    )


def test_auto_is_the_tree_backend_here() -> None:
    assert control_for("auto").name == "tree"


def test_a_pipeline_runs_and_its_output_is_read(tmp_path: Path) -> None:
    """Spawn and output: the fake pipeline's JSON line is the result; it ran in the folder
    given, as a child of this process."""
    outcome = attempt(fake("ok.com"), tmp_path)
    assert outcome.status == "succeeded", outcome.error
    assert outcome.exit_code == 0
    assert outcome.result is not None
    assert outcome.result["site"] == "ok.com"
    assert Path(outcome.result["cwd"]) == tmp_path
    assert outcome.result["ppid"] == os.getpid()


def test_a_failure_keeps_its_stderr_line(tmp_path: Path) -> None:
    outcome = attempt(fake("fail.com"), tmp_path)
    assert outcome.status == "failed"
    assert outcome.exit_code == 1
    assert outcome.cause == "fail.com: boom on attempt 1"


def test_a_timeout_stops_the_pipeline_and_its_grandchild(tmp_path: Path) -> None:
    """Timed out with a grandchild: the attempt is `timed_out` (nothing raised where
    Ctrl-Break can't be sent), neither process is left, and the grace was not waited out
    where nothing could be asked."""
    started = time.monotonic()
    outcome = attempt(fake("hang.com"), tmp_path, timeout=3)
    elapsed = time.monotonic() - started
    pipeline, grandchild = hanging_pids(tmp_path, timeout=30)
    assert outcome.status == "timed_out", outcome.error
    assert outcome.error == "timed out after 3 s: hanging"
    assert wait_until_gone([pipeline, grandchild], timeout=10) == []
    assert elapsed < GRACE


def test_ctrl_break_fails_here_and_the_stop_goes_on(tmp_path: Path) -> None:
    """What the fallback is for, as this machine shows it. A Ctrl-Break to a process group
    of its own, with no console to send it from, raises (under Wine always): CPython 3.11's
    `os.kill` then terminates the process itself (the leader only, not its group) and
    raises SystemError, its cause the OSError. `stop_tree` still ends a whole tree, a
    grandchild and a pipeline deaf to SIGTERM included, without waiting out the grace."""
    probe = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        stdin=subprocess.DEVNULL,
        creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
    )
    proctree.end_with_us(probe.pid)
    try:
        probe.send_signal(signal.CTRL_BREAK_EVENT)
        delivered = True
    except Exception as exc:
        delivered = False
        print(f"Ctrl-Break is not delivered here: {exc!r} (cause: {exc.__cause__!r})")
    finally:
        probe.kill()
        probe.wait()
    if _under_wine():
        assert not delivered

    proc = proctree.spawn(fake("stubborn.com"), cwd=tmp_path, env=_env(tmp_path))
    pids = hanging_pids(tmp_path, timeout=30)
    proctree.watch(proc)
    started = time.monotonic()
    proctree.stop_tree(proc, GRACE)
    assert time.monotonic() - started < GRACE / 2
    assert wait_until_gone(pids, timeout=10) == []


def test_a_cancel_stops_every_running_tree(tmp_path: Path) -> None:
    """Ctrl-C / cancel: what the flow calls once its stop request is set
    (`stop_everything` for the flow run) ends two running attempts, one deaf to SIGTERM, at
    once where Ctrl-Break can't be sent; each attempt returns its outcome, nothing is left."""
    outcomes: list[str] = []

    def one(site: str) -> None:
        folder = tmp_path / site
        folder.mkdir()
        outcomes.append(attempt(fake(site), folder, timeout=300, owner="flow-run-w").status)

    threads = [threading.Thread(target=one, args=(site,)) for site in ("hang-a", "stubborn-b")]
    for thread in threads:
        thread.start()
    pids = [pid for site in ("hang-a", "stubborn-b") for pid in hanging_pids(tmp_path / site)]
    started = time.monotonic()
    stopped = stop_everything("auto", GRACE, owner="flow-run-w")
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=60)
    assert len(stopped) == 2
    assert len(outcomes) == 2, outcomes
    assert wait_until_gone(pids, timeout=10) == []
    if _under_wine():
        assert elapsed < GRACE / 2


def test_the_keeper_stops_a_server_it_cannot_ask(tmp_path: Path) -> None:
    """The kept local server's keeper (`keeper.stop_server`) on a Windows "server" in its own
    process group with a child: where Ctrl-Break can't be sent it kills both at once,
    not after STOP_GRACE (10 s)."""
    server = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time;"
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)']);"
         "print('up', flush=True); time.sleep(1000)"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
    )  # fmt: skip
    proctree.end_with_us(server.pid)
    assert server.stdout is not None and server.stdout.readline().strip() == b"up"
    tree = [server.pid, *(c.pid for c in psutil.Process(server.pid).children(recursive=True))]
    assert len(tree) == 2
    started = time.monotonic()
    keeper.stop_server(server)
    elapsed = time.monotonic() - started
    assert wait_until_gone(tree, timeout=10) == []
    if _under_wine():
        assert elapsed < keeper.STOP_GRACE / 2


def test_a_background_grandchild_is_stopped_after_a_normal_exit(tmp_path: Path) -> None:
    """A pipeline that exits 0 but leaves a process behind: the stop after its exit ends
    that one too (the leader gone, each process is ended, and the pipeline's job)."""
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)']); "
        f"open({str(tmp_path / 'bg.pid')!r}, 'w').write(str(p.pid)); time.sleep(1); "
        "print('done')"
    )
    outcome = attempt([sys.executable, "-c", script], tmp_path)
    assert outcome.status == "succeeded", outcome.error
    assert wait_until_gone([int((tmp_path / "bg.pid").read_text())], timeout=10) == []


def test_process_control_group_is_a_clear_error_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No POSIX process groups on Windows: `process_control: group` is exit 2 naming the
    key and what is expected, and nothing runs."""
    config = write_config(tmp_path, ["ok.com"], process_control="group")
    code, out, err = cli_in_process(["validate", "--config", str(config)], capsys)
    assert code == 2, out + err
    assert "pipeline.process_control = 'group'" in err
    assert not (tmp_path / "timeline.tsv").exists()


def test_a_tree_over_its_memory_limit_is_stopped(tmp_path: Path) -> None:
    """`memory_limit`: 120 MB in the pipeline and 120 MB in its child pass 200 MB at a
    sample; the attempt is stopped long before its timeout, neither process is left."""
    outcome = attempt(
        [sys.executable, str(HOG), "--site", "hog", "--mb", "120", "--child-mb", "120",
         "--hold", "120"],
        tmp_path,
        memory_limit=200.0,
        timeout=120,
    )  # fmt: skip
    assert outcome.status == "timed_out", outcome.error
    assert (outcome.error or "").startswith("over memory: ")
    pids = [int(p) for f in tmp_path.glob("*.pids") for p in f.read_text().split()]
    assert len(pids) == 2
    assert wait_until_gone(pids, timeout=10) == []


def test_a_job_that_counts_nothing_gives_null_never_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Honest cost: the pipeline burns 0.5 s of CPU and holds 60 MB. What its own Job Object
    counted is read as it is (under Wine: CPU 0 and peak 0, which `job_account` must not
    pass on); the outcome's figures are real or null, never 0 s or 0 MB."""
    raw: list[tuple[float, int]] = []
    real = job_object.job_account

    def reading(basic: job_object._BasicAccounting, extended: job_object._ExtendedLimits) -> object:
        raw.append((basic.TotalUserTime + basic.TotalKernelTime, extended.PeakProcessMemoryUsed))
        return real(basic, extended)

    monkeypatch.setattr(job_object, "job_account", reading)
    outcome = attempt(
        [sys.executable, str(HOG), "--site", "cost", "--mb", "60", "--burn", "0.5",
         "--hold", "1"],
        tmp_path,
    )  # fmt: skip
    assert outcome.status == "succeeded", outcome.error
    print(f"the job counted (100 ns of CPU, peak bytes): {raw}; outcome: "
          f"cpu_s={outcome.cpu_s}, peak_rss_mb={outcome.peak_rss_mb}")  # fmt: skip
    assert len(raw) == 1  # the job was read once, when the tree had ended
    if _under_wine():
        assert raw == [(0, 0)]  # what Wine 8.0 gives: no figure at all
    assert outcome.cpu_s is None or outcome.cpu_s > 0
    assert outcome.peak_rss_mb is None or outcome.peak_rss_mb > 0


def _under_wine() -> bool:
    import ctypes

    return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")


def test_a_killed_flow_process_takes_its_pipelines_with_it(tmp_path: Path) -> None:
    """Kill-on-close: a flow process (a stand-in that spawns a hanging pipeline with the tree
    backend) is killed outright (TerminateProcess, no cleanup of its own); the Job Object's
    handle closes with it, and the pipeline and its grandchild die too."""
    script = (
        "import os, time\n"
        "from flows.process import trees\n"
        f"trees.spawn({fake('hang.com')!r}, cwd={str(tmp_path)!r}, env=dict(os.environ))\n"
        "print('spawned', flush=True)\n"
        "time.sleep(1000)\n"
    )
    flow = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**_env(tmp_path), "PYTHONPATH": str(ROOT)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    proctree.end_with_us(flow.pid)  # it dies with this test in any case
    try:
        assert flow.stdout is not None and flow.stdout.readline().strip() == b"spawned"
        pids = hanging_pids(tmp_path, timeout=30)
        assert all(alive(pid) for pid in pids)
        psutil.Process(flow.pid).kill()
        flow.wait(timeout=30)
        assert wait_until_gone(pids, timeout=15) == []
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait()


@pytest.mark.parametrize(
    "site",
    ["CON", "nul.com", "com1.example", "a\\b.com", "c:\\windows.com", "x" * 300],
)
def test_names_that_windows_reserves_get_a_folder_inside_the_output(
    tmp_path: Path, site: str
) -> None:
    """Device names, backslashes, a drive and a 300-character name: the site's folder is a
    real folder inside `output_dir` (a device name would be the device), and its attempt's
    log is written there, under a path longer than MAX_PATH (260) for the long name."""
    output = tmp_path / ("o" * 60)  # with the long name's folder, past MAX_PATH
    folder = site_output_dir(output, site)
    assert folder.parent == output
    log = attempt_log_path(folder, str(uuid.uuid4()), 1)
    outcome = attempt(fake(site), tmp_path, log_file=log)
    assert outcome.status == "succeeded", outcome.error
    assert log.is_file()
    assert f'"site": {json.dumps(site)}' in log.read_text(encoding="utf-8")
    assert [p.name for p in output.iterdir()] == [folder.name]
    if len(site) > 260:
        assert len(str(log)) > 260


def test_a_log_past_max_path(tmp_path: Path) -> None:
    """An attempt's log in a folder past MAX_PATH (260 characters): written whole."""
    deep = tmp_path.joinpath(*["d" * 50] * 5)
    log = deep / "logs" / "attempt-1.log"
    assert len(str(log)) > 260
    outcome = attempt(fake("ok.com"), tmp_path, log_file=log)
    assert outcome.status == "succeeded", outcome.error
    assert '"site": "ok.com"' in log.read_text(encoding="utf-8")


def _env(folder: Path) -> dict[str, str]:
    return {**os.environ, "FAKE_PIDS_DIR": str(folder)}
