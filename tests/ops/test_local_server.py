"""The kept local server (`pipeline.local_server_idle`, flows/ops/local_server.py): with no
PREFECT_API_URL a run starts one `prefect server start` for its PREFECT_HOME and the next
run reuses it; the recorded server is checked, never trusted; it stops when idle or on
`server stop`.

The checks of a recorded server run against a small HTTP server in this process; the whole
path (CLI runs, a real keeper and server) in the slow tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from flows.ops import keeper
from flows.ops import local_server as ls
from flows.ops import local_server_checks as lschecks
from flows.ops import local_server_files as lsfiles
from flows.ops import local_server_start as lsstart
from flows.process import holders
from tests.conftest import ROOT, cli_env, read_timeline, run_cli, write_config
from tests.support.processes import keepers_under, start_tied, stop_keepers, tie_keepers
from tests.support.servers import embedded_env, seed_home
from tests.support.waiting import wait_for, wait_until

SERVER_NOISE = re.compile(r"prefect\.server|telemetry|uvicorn|docket|Traceback|sqlite3\.")
PREFECT_VERSION = "3.9.1"


class _Answers(BaseHTTPRequestHandler):
    version = PREFECT_VERSION

    ui_calls: str | None = None  # what /ui-settings says the UI calls; None: no UI

    def do_GET(self) -> None:
        answers: dict[str, object] = {"/api/health": True, "/api/admin/version": self.version}
        if self.ui_calls is not None:
            answers["/ui-settings"] = {"api_url": self.ui_calls, "enabled": True}
        if self.path not in answers:
            self.send_error(404)
            return
        body = json.dumps(answers[self.path]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def answering() -> Iterator[str]:
    """The API URL of a small server that answers /health and /admin/version like Prefect."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def a_state(
    url: str, pid: int, started: float | None = None, version: str = PREFECT_VERSION
) -> lsfiles.ServerState:
    if started is None:
        started = psutil.Process(pid).create_time()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    return lsfiles.ServerState(url, port, pid, started, version, time.time())


def a_dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert done.returncode == 0
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_recorded_server_is_used_only_when_its_keeper_lives_and_it_answers_our_version(
    answering: str,
) -> None:
    """ok: the keeper (this process) is alive with the recorded start time and the URL
    answers this version. Another version (the server's or the file's) is not reused; a
    keeper that lives but a URL that does not answer is 'no-answer' (ours, to replace); a
    keeper that is gone, or a pid now another process (another start time), is 'foreign'
    when something still answers there and 'dead' when nothing does."""
    me = os.getpid()
    closed = f"http://127.0.0.1:{lsstart.free_port()}/api"
    assert lschecks.verdict(a_state(answering, me), PREFECT_VERSION) == "ok"
    assert lschecks.verdict(a_state(answering, me), "3.9.2") == "other-version"
    older = a_state(answering, me, version="3.8.0")
    assert lschecks.verdict(older, PREFECT_VERSION) == "other-version"
    assert lschecks.verdict(a_state(closed, me), PREFECT_VERSION) == "no-answer"
    reused_pid = a_state(answering, me, started=psutil.Process(me).create_time() - 100)
    assert lschecks.verdict(reused_pid, PREFECT_VERSION) == "foreign"
    gone = a_dead_pid()
    assert lschecks.verdict(a_state(answering, gone, started=1.0), PREFECT_VERSION) == "foreign"
    assert lschecks.verdict(a_state(closed, gone, started=1.0), PREFECT_VERSION) == "dead"


def test_a_broken_state_file_is_no_server_and_a_written_one_reads_back(tmp_path: Path) -> None:
    """A missing, truncated or foreign-shaped `local-server.json` is None (a run starts a
    server); one written by `write_state` reads back field for field."""
    assert lsfiles.read_state(tmp_path) is None
    (tmp_path / lsfiles.STATE_FILE).write_text('{"url": "http://127.0.0.1:1/api", "port"')
    assert lsfiles.read_state(tmp_path) is None
    (tmp_path / lsfiles.STATE_FILE).write_text('["not", "a", "mapping"]')
    assert lsfiles.read_state(tmp_path) is None
    state = lsfiles.ServerState("http://127.0.0.1:5/api", 5, 42, 1.5, PREFECT_VERSION, 2.5)
    lsfiles.write_state(tmp_path, state)
    assert lsfiles.read_state(tmp_path) == state
    lsfiles.remove_state(tmp_path, keeper_pid=43)  # another keeper's: left alone
    assert lsfiles.read_state(tmp_path) == state
    lsfiles.remove_state(tmp_path, keeper_pid=42)
    assert lsfiles.read_state(tmp_path) is None


def test_only_runs_whose_process_lives_count_as_on_the_server(tmp_path: Path) -> None:
    """A registered live process counts, with its idle seconds; the file of a process that
    has ended, or of a pid that another process now has, is removed and does not count;
    `leave` removes this run's."""
    mine = lsfiles.register(tmp_path, 600)
    users = tmp_path / lsfiles.USERS_DIR
    (users / "dead.json").write_text(json.dumps({"pid": a_dead_pid(), "started": 1, "idle": 5}))
    me = os.getpid()
    (users / "reused.json").write_text(json.dumps({"pid": me, "started": 1.0, "idle": 5}))
    (users / "junk.json").write_text("{")
    live = lsfiles.live_users(tmp_path)
    assert [(user.pid, user.idle, user.path) for user in live] == [(me, 600, mine)]
    assert sorted(path.name for path in users.iterdir()) == [mine.name]
    use = ls.ServerUse(a_state("http://127.0.0.1:1/api", me), "reused", 600, mine)
    use.leave()
    assert lsfiles.live_users(tmp_path) == []


def server_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "local Prefect server at" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def url_in(line: str) -> str:
    found = re.search(r"http://127\.0\.0\.1:\d+/api", line)
    assert found, line
    return found.group(0)


def gone(pids: list[int]) -> bool:
    return not any(holders.process_started(pid) is not None for pid in pids)


def server_tree(home: Path) -> list[int]:
    """The keeper of `home` and every process under it (the server)."""
    pids = []
    for found in keepers_under(home):
        pids += [found.pid, *(child.pid for child in found.children(recursive=True))]
    return pids


class Watched(subprocess.CompletedProcess[str]):
    servers_seen: int = 0


def run_watching_for_servers(args: list[str], env: dict[str, str]) -> Watched:
    """`python -m flows ARGS`, its process tree watched until it ends: how many Prefect
    server processes (a temporary server's uvicorn, which Prefect would start itself) were
    ever under it."""
    proc = start_tied(
        [sys.executable, "-m", "flows", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen: set[int] = set()
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.communicate()), daemon=True)
    reader.start()
    while reader.is_alive():
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if any(
                        "uvicorn" in part or "prefect.server" in part for part in child.cmdline()
                    ):
                        seen.add(child.pid)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        reader.join(0.05)
    done = Watched(proc.args, proc.returncode, out[0], out[1])
    done.servers_seen = len(seen)
    return done


@pytest.mark.slow  # CLI runs, a real keeper and `prefect server start`, started twice
def test_a_second_run_reuses_the_server_the_first_started_and_server_stop_ends_it(
    tmp_path: Path,
) -> None:
    """Run 1 says it started a local server (one line, nothing of the server's own output
    on the terminal, which goes to logs/local-server.log); run 2 says it reused the same
    URL, and no second server was started, by it or by Prefect under it; `server status`
    and `doctor` list it. A recorded server of another Prefect version is not reused: run
    3 stops it and starts another.
    `server stop` ends the keeper and the server; `server status` then exits 1."""
    home = tmp_path / "home"
    env = embedded_env(home)
    config = write_config(tmp_path, ["ok-a", "ok-b"], local_server_idle=300)
    try:
        first = run_cli(["run", "--config", str(config)], env)
        tie_keepers(home)
        assert first.returncode == 0, first.stderr[-3000:]
        started = server_line(first.stderr)
        assert "started a local Prefect server at" in started and "300 s after" in started
        url = url_in(started)
        assert [
            line for line in (first.stdout + first.stderr).splitlines() if SERVER_NOISE.search(line)
        ] == []
        assert (home / "logs" / "local-server.log").stat().st_size > 0
        (kept,) = keepers_under(home)
        state = lsfiles.read_state(home)
        assert state is not None and state.url == url and state.keeper_pid == kept.pid

        second = run_watching_for_servers(["run", "--config", str(config)], env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert second.servers_seen == 0  # the flow used the kept server: no temporary one
        reused = server_line(second.stderr)
        assert "reused the local Prefect server at" in reused and url_in(reused) == url
        assert [k.pid for k in keepers_under(home)] == [kept.pid]
        assert "temporary" not in second.stderr
        assert len(read_timeline(tmp_path)) == 8  # both runs ran both sites

        status = run_cli(["server", "status"], env)
        assert status.returncode == 0 and url in status.stdout, status.stdout + status.stderr
        assert "idle: it stops at" in status.stdout
        doctor = run_cli(["doctor"], env)
        assert f"local server: {url}" in doctor.stdout, doctor.stdout + doctor.stderr

        lsfiles.write_state(home, lsfiles.ServerState(**{**state.__dict__, "version": "3.8.0"}))
        old_tree = server_tree(home)
        third = run_cli(["run", "--config", str(config)], env)
        tie_keepers(home)
        assert third.returncode == 0, third.stderr[-3000:]
        assert "started a local Prefect server at" in server_line(third.stderr)
        assert gone(old_tree)

        new_tree = server_tree(home)
        stopped = run_cli(["server", "stop"], env)
        assert stopped.returncode == 0 and "stopped the local Prefect server" in stopped.stdout
        wait_until(lambda: gone(new_tree), "the keeper and its server gone", timeout=30)
        assert lsfiles.read_state(home) is None
        after = run_cli(["server", "status"], env)
        assert after.returncode == 1 and "local server: none" in after.stdout
    finally:
        stop_keepers(home)


@pytest.mark.slow  # two CLI runs at once, a real keeper and `prefect server start`
def test_two_runs_at_once_start_one_server_which_stops_when_idle(tmp_path: Path) -> None:
    """A stale record (a keeper that died, nothing on its port) is replaced; two runs
    started together start one server between them (one says started, the other reused,
    the same URL), and once both have ended it stops by itself after `local_server_idle`
    (2 s): keeper, server and record gone."""
    home = tmp_path / "home"
    env = embedded_env(home)
    closed = f"http://127.0.0.1:{lsstart.free_port()}/api"
    lsfiles.write_state(home, a_state(closed, a_dead_pid(), started=1.0))
    config = write_config(tmp_path, ["ok-a"], local_server_idle=2)
    try:
        runs = [
            start_tied(
                [sys.executable, "-m", "flows", "run", "--config", str(config)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        wait_until(lambda: tie_keepers(home), "the runs' keeper", timeout=120)
        outputs = [run.communicate(timeout=240) for run in runs]
        assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
        lines = sorted(server_line(err) for _, err in outputs)
        assert [line.split(" the local")[0].split(" a local")[0] for line in lines] == [
            "site-pipeline: reused",
            "site-pipeline: started",
        ]
        assert url_in(lines[0]) == url_in(lines[1]) != closed
        tree = server_tree(home)
        assert tree
        wait_until(lambda: gone(tree), "the idle server stopped by itself", timeout=60)
        assert lsfiles.read_state(home) is None
    finally:
        stop_keepers(home)


def test_doctor_lists_no_local_server_when_the_user_set_an_api_url(
    prefect_api: str, tmp_path: Path
) -> None:
    """With PREFECT_API_URL set, runs never use a local server: `doctor` does not list one
    (it does on the embedded default: the slow test above)."""
    env = {**cli_env(prefect_api), "PREFECT_HOME": str(tmp_path / "home")}
    doctor = run_cli(["doctor"], env)
    assert f"Prefect API: {prefect_api}" in doctor.stdout, doctor.stdout + doctor.stderr
    assert "local server" not in doctor.stdout + doctor.stderr


def a_user(idle: float) -> lsfiles.User:
    return lsfiles.User(os.getpid(), 0.0, idle, Path("unused"))


def test_the_server_stays_for_the_idle_time_of_the_last_busy_spell_s_runs() -> None:
    """Within one spell of use the largest run's idle time counts; a command that is not a
    run (`history`, idle -1) keeps the idle time the runs set, also when it opens a spell of
    its own; a new spell's run replaces an earlier spell's idle time, smaller or larger."""
    assert keeper.idle_after(0, [a_user(600)], new_spell=True) == 600
    assert keeper.idle_after(600, [a_user(600), a_user(5)], new_spell=False) == 600
    assert keeper.idle_after(5, [a_user(5), a_user(60)], new_spell=False) == 60
    assert keeper.idle_after(600, [a_user(-1)], new_spell=True) == 600
    assert keeper.idle_after(600, [a_user(-1)], new_spell=False) == 600
    assert keeper.idle_after(600, [a_user(5)], new_spell=True) == 5
    assert keeper.idle_after(5, [a_user(900), a_user(-1)], new_spell=True) == 900


@pytest.mark.slow  # a CLI run whose kept server fails to start
def test_a_kept_server_that_cannot_start_is_one_error_naming_its_log_and_its_last_lines(
    tmp_path: Path,
) -> None:
    """A database the server can't open: `prefect server start` exits, and so does its
    keeper; the run says so at once (not after the start-up wait) in one `error:` line
    naming the log, then the log's last lines (the database error), exits 1, and no site
    ran; nothing is recorded."""
    home = tmp_path / "home"
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    env = {
        **embedded_env(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{not_a_folder}/x.db",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600",
    }
    config = write_config(tmp_path, ["ok-a"], local_server_idle=60)
    try:
        result = run_cli(["run", "--config", str(config)], env, timeout=300)
    finally:
        stop_keepers(home)
    assert result.returncode == 1, result.stderr[-3000:]
    log = home / "logs" / "local-server.log"
    errors = [line for line in result.stderr.splitlines() if "site-pipeline: error" in line]
    assert errors == [
        "site-pipeline: error: the local Prefect server exited before it answered; "
        f"its log: {log}; its last lines:"
    ], result.stderr[-3000:]
    assert "  sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) unable to open " in (
        result.stderr
    )
    assert not (tmp_path / "timeline.tsv").exists()
    assert lsfiles.read_state(home) is None


def test_a_server_whose_ui_calls_another_address_is_not_reused(answering: str) -> None:
    """A kept server whose `/ui-settings` names its own API is ok (also with no UI to ask);
    one whose UI calls another address (4200, as keepers before the fix started them) is
    'wrong-ui': replaced like one of another version, and `server status` says why."""
    me = os.getpid()
    assert lschecks.ui_api_url(answering) is None
    _Answers.ui_calls = answering
    try:
        assert lschecks.ui_api_url(answering) == answering
        assert lschecks.verdict(a_state(answering, me), PREFECT_VERSION) == "ok"
        _Answers.ui_calls = "http://127.0.0.1:4200/api"
        assert lschecks.verdict(a_state(answering, me), PREFECT_VERSION) == "wrong-ui"
    finally:
        _Answers.ui_calls = None


def test_the_server_s_ui_is_told_the_server_s_own_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keeper's server gets PREFECT_SERVER_UI_API_URL = its own API on its port, and a
    UI URL the user set (either name) does not reach it; its UI is that address less /api."""
    monkeypatch.setenv("PREFECT_UI_API_URL", "http://elsewhere:1/api")
    monkeypatch.setenv("PREFECT_SERVER_UI_API_URL", "http://elsewhere:2/api")
    env = keeper.server_env(4711)
    assert env["PREFECT_SERVER_UI_API_URL"] == "http://127.0.0.1:4711/api"
    assert "PREFECT_UI_API_URL" not in env
    assert env["PREFECT_HOME"] == os.environ["PREFECT_HOME"]
    state = lsfiles.ServerState("http://127.0.0.1:4711/api", 4711, 1, 1.0, PREFECT_VERSION, 1.0)
    assert state.ui_url == "http://127.0.0.1:4711"


def test_the_port_is_the_last_one_when_free_else_the_preferred_one_else_any(
    tmp_path: Path,
) -> None:
    """`choose_port`: the port this home used last when nothing listens there (its printed
    links keep working, even when 4200 is free again); else the preferred port (4200 in use)
    when free; else a free port."""
    import socket

    preferred = lsstart.free_port()
    assert lsstart.choose_port(tmp_path, preferred) == preferred  # a new home
    last = lsstart.free_port()
    assert last != preferred
    (tmp_path / lsfiles.PORT_FILE).write_text(str(last))
    assert lsstart.port_free(preferred)
    assert lsstart.choose_port(tmp_path, preferred) == last
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", last))
        taken.listen()
        assert not lsstart.port_free(last)
        assert lsstart.choose_port(tmp_path, preferred) == preferred
        with socket.socket() as also_taken:
            also_taken.bind(("127.0.0.1", preferred))
            also_taken.listen()
            other = lsstart.choose_port(tmp_path, preferred)
            assert other not in (preferred, last) and lsstart.port_free(other)


def test_a_port_whose_server_just_closed_is_free_again() -> None:
    """The port of a server that stopped a moment ago (its closed connections in TIME_WAIT)
    is free, as it is for uvicorn: the next run gets the same address back."""
    import socket

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server's side closes first: TIME_WAIT on its port
        wait_until(lambda: client.recv(1) == b"", "the client sees the close")
        client.close()
    assert lsstart.port_free(port)


def test_a_hold_names_its_keeper_and_its_end(tmp_path: Path) -> None:
    """`held_until`: inf for a hold until `server stop` (until null), the time for one with
    an end, None for no hold, another keeper's or a broken file."""
    path = tmp_path / lsfiles.HOLD_FILE
    assert lsfiles.held_until(tmp_path, 7) is None
    path.write_text(json.dumps({"keeper_pid": 7, "until": None}))
    assert lsfiles.held_until(tmp_path, 7) == float("inf")
    assert lsfiles.held_until(tmp_path, 8) is None
    path.write_text(json.dumps({"keeper_pid": 7, "until": 123.5}))
    assert lsfiles.held_until(tmp_path, 7) == 123.5
    path.write_text("{")
    assert lsfiles.held_until(tmp_path, 7) is None


_FAKE_KEEPER = """
import sys
from pathlib import Path
from flows.ops import keeper
keeper.server_argv = lambda port: [sys.executable, "-c", "import time; time.sleep(600)"]
sys.exit(keeper.keep(Path(sys.argv[1]), 0))
"""


def _reaper_of(pid: int) -> psutil.Process | None:
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return None
    for child in children:
        try:
            if any(part.endswith("_reaper.py") for part in child.cmdline()):
                return child
        except psutil.Error:
            pass
    return None


def test_once_the_keeper_stopped_its_server_the_reaper_forgets_its_group(tmp_path: Path) -> None:
    """A keeper (a long sleep for its server, no run on it: it stops it at once when idle)
    ends, and its reaper ends with it, at once: the keeper told it to forget the server's
    group after stopping it. Without that the reaper holds the group and lingers 5 s at the
    keeper's exit, to signal a group that is gone."""
    proc = start_tied(
        [sys.executable, "-c", _FAKE_KEEPER, str(tmp_path)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    reaper = wait_until(lambda: _reaper_of(proc.pid), "the keeper's reaper", timeout=30)
    assert proc.wait(timeout=60) == 0
    ended = time.monotonic()
    wait_until(lambda: not reaper.is_running() or reaper.status() == psutil.STATUS_ZOMBIE,
               "the reaper gone", timeout=30)  # fmt: skip
    assert time.monotonic() - ended < 3.0  # it lingers 5 s while it holds a group


_ASKED_KEEPER = """
import sys
from pathlib import Path
from flows.ops import keeper
server = (
    "import pathlib, signal, sys, time; folder = pathlib.Path(sys.argv[1]);"
    "signal.signal(signal.SIGTERM, lambda *_: (folder.joinpath('asked').touch(), sys.exit(0)));"
    "folder.joinpath('up').touch(); time.sleep(600)"
)
keeper.server_argv = lambda port: [sys.executable, "-c", server, sys.argv[1]]
sys.exit(keeper.keep(Path(sys.argv[1]), 0))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="Windows asks with Ctrl-Break")
def test_the_keeper_asks_its_server_to_stop_and_the_server_hears_it(tmp_path: Path) -> None:
    """Once the last run leaves, the keeper's SIGTERM reaches its server, which stops
    cleanly (its handler ran), not killed after `STOP_GRACE`. (The keeper used to start it
    with SIGTERM blocked, a mask the server inherited: every stop took 10 s and a kill.)"""
    user = lsfiles.register(tmp_path, 0)  # this test is the run on it, until it leaves
    proc = start_tied(
        [sys.executable, "-c", _ASKED_KEEPER, str(tmp_path)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    wait_until(lambda: (tmp_path / "up").exists(), "the server's start", timeout=60)
    user.unlink()
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "asked").exists()


@pytest.mark.slow  # a CLI run on a server with no idle time, then a held one
def test_a_run_with_no_idle_time_says_how_to_see_it_and_server_start_brings_it_back(
    tmp_path: Path,
) -> None:
    """`local_server_idle: 0`: the run starts a local server that stops as soon as the run
    ends; its last lines give its flow run id and `server start`, and no link (its server
    is gone). `server start` starts the kept server on the same database (the run is there)
    and prints its UI; it stays past any idle time until a `server start --idle 1` replaces
    the hold (reused, not started again), after which it stops by itself; `server status`
    says which hold it is under."""
    home = tmp_path / "home"
    env = embedded_env(home)
    config = write_config(tmp_path, ["ok-a"], local_server_idle=0)
    summary = tmp_path / "summary.json"
    try:
        done = run_cli(["run", "--config", str(config), "--summary-json", str(summary)], env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "it stops when the last command on it ends" in server_line(done.stderr)
        wait_until(lambda: not keepers_under(home), "the run's server stopped", timeout=30)
        assert lsfiles.read_state(home) is None
        flow_run_id = json.loads(summary.read_text())["flow_run_id"]
        assert done.stdout.splitlines()[-2:] == [
            f"flow run: {flow_run_id} (its local Prefect server stops with the run)",
            "  to see it in the UI: `site-pipeline server start` prints the UI's address; the "
            f"run is at <UI>/runs/flow-run/{flow_run_id}",
        ]
        assert "http" not in done.stdout

        started = run_cli(["server", "start"], env)
        tie_keepers(home)
        assert started.returncode == 0, started.stdout + started.stderr
        state = lsfiles.read_state(home)
        assert state is not None
        assert started.stdout.splitlines() == [
            f"started the local Prefect server at {state.url} for PREFECT_HOME {home}",
            f"UI: {state.ui_url}",
            "it stays until `site-pipeline server stop`; runs with no PREFECT_API_URL use it",
        ]
        import httpx

        assert httpx.get(f"{state.url}/flow_runs/{flow_run_id}").status_code == 200
        status = run_cli(["server", "status"], env)
        assert f"  UI: {state.ui_url}" in status.stdout
        assert "held by `server start`: it stays until `site-pipeline server stop`" in (
            status.stdout
        )
        tree = server_tree(home)
        assert not wait_for(lambda: gone(tree), timeout=3)  # no run on it, no idle time: held

        shorter = run_cli(["server", "start", "--idle", "1"], env)
        assert shorter.returncode == 0, shorter.stdout + shorter.stderr
        assert shorter.stdout.startswith(f"reused the local Prefect server at {state.url}")
        assert "it stays until 1 s from now, or later" in shorter.stdout
        wait_until(lambda: gone(tree), "the server stopped once the hold ended", timeout=60)
        assert lsfiles.read_state(home) is None
    finally:
        stop_keepers(home)


def test_server_start_s_idle_must_be_a_whole_number_of_seconds(tmp_path: Path) -> None:
    """`server start --idle 0` (or a word) is a usage error: exit 2 naming the value, and no
    server starts."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    for bad in ("0", "soon"):
        result = run_cli(["server", "start", "--idle", bad], env)
        assert result.returncode == 2, result.stderr
        assert f"--idle: '{bad}': expected a whole number > 0" in result.stderr
    assert not (tmp_path / "home" / lsfiles.STATE_FILE).exists()


def test_a_process_listening_on_a_port_is_seen_and_one_that_is_not_is_not() -> None:
    """`listens_on`: this process, listening on a port, does; on another port it does not;
    a pid that is gone listens on nothing."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert lschecks.listens_on(os.getpid(), port) is True
        assert lschecks.listens_on(os.getpid(), lsstart.free_port()) is False
    assert lschecks.listens_on(a_dead_pid(), port) is False


@pytest.mark.slow  # a real keeper whose server can't listen, then one that does
def test_a_server_that_answers_on_the_chosen_port_but_is_not_ours_is_not_taken(
    answering: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another home's server got the chosen port first (here a small server answering like
    Prefect of our version): its answers are not taken for our keeper's, whose server can't
    listen there and exits; the start then takes a free port, where our own server answers."""
    home = seed_home(tmp_path / "home")
    taken = int(answering.rsplit(":", 1)[1].split("/")[0])
    monkeypatch.setattr(lsstart, "choose_port", lambda home: taken)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    user = lsfiles.register(home, 60)  # a run on it, as `join` registers one before a start
    try:
        state = lsstart.start(home, PREFECT_VERSION, startup_timeout=120)
        tie_keepers(home)
        assert state.port != taken
        assert lschecks.listens_on(state.keeper_pid, state.port) is True
        assert lsfiles.read_state(home) == state
        assert lschecks.verdict(state, PREFECT_VERSION) == "ok"
    finally:
        user.unlink(missing_ok=True)
        stop_keepers(home)


@pytest.mark.parametrize(
    "said",
    [
        "ERROR | uvicorn.error - [Errno 98] error while attempting to bind on address "
        "('127.0.0.1', 4200): address already in use",
        "[WinError 10048] only one usage of each socket address (protocol/network "
        "address/port) is normally permitted",
        # `prefect server start`'s own check, wrapped by rich as a CI log had it
        "  Port 4200 is already in use. Please specify a different port with the `--port`\n  flag.",
        "  A background server process is already running on port 4200. Run `prefect\n"
        "  server stop` to stop it or specify a different port with the `--port` flag.",
    ],
)
def test_a_server_that_could_not_listen_is_told_from_its_log(tmp_path: Path, said: str) -> None:
    """A start whose server exited because its port was taken (as uvicorn, Windows or
    Prefect's own check say it) is tried once more on a free port, even when the port is free
    again by the time it is looked at (the other home's server was stopped meanwhile);
    another exit is not."""
    log = tmp_path / "local-server.log"
    log.write_text(f"Check out the dashboard at http://127.0.0.1:4200\n{said}\n")
    assert lsstart._port_was_taken(log)
    log.write_text("sqlite3.OperationalError: unable to open database file\n")
    assert not lsstart._port_was_taken(log)
    assert not lsstart._port_was_taken(tmp_path / "missing.log")


def test_a_second_start_takes_the_port_the_home_used_last_then_any_free_one(
    tmp_path: Path,
) -> None:
    """After its port was taken, a start is tried again on the home's last port (its UI's
    address stays the same) when that is another port and free; else on any free port."""
    import socket

    home = tmp_path / "home"
    home.mkdir()
    last = lsstart.free_port()
    (home / lsfiles.PORT_FILE).write_text(str(last), encoding="utf-8")
    assert lsstart.retry_port(home, taken=4200) == last
    assert lsstart.retry_port(home, taken=last) not in (last, 4200)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", last))
        holder.listen()
        assert lsstart.retry_port(home, taken=4200) != last
    (home / lsfiles.PORT_FILE).write_text("not a port", encoding="utf-8")
    assert lsstart.retry_port(home, taken=4200) > 0
