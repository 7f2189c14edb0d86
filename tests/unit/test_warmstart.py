"""The `visionops` command's temporary Prefect server, started ahead of the flow, imports
while it starts, and the command's exit without the interpreter's teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from visionops.ops.warmstart import flow_settings, import_while_waiting, start_prefect_server


class Starting:
    """Stands in for a TemporaryServer: starting until `done` is set."""

    def __init__(self):
        self.done = threading.Event()

    def starting(self) -> bool:
        return not self.done.is_set()


@pytest.fixture(scope="module")
def server_env(tmp_path_factory) -> dict:
    """No PREFECT_API_URL, and one Prefect home for the module: its database is created
    once (seconds), by the first test that starts a server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect"))
    return env


def gone(pid: int, within: float) -> bool:
    """The process ends (or is a zombie waiting to be reaped) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_imports_only_while_the_server_is_still_starting():
    server = Starting()

    assert import_while_waiting(server, ["colorsys", "sched"]) == ["colorsys", "sched"]
    server.done.set()
    assert import_while_waiting(server, ["wave"]) == []
    assert import_while_waiting(None, ["wave"]) == []


def test_nothing_is_started_when_prefect_api_url_names_a_server():
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert start_prefect_server() is None


def test_no_heartbeats_only_for_a_run_on_the_temporary_server():
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    with flow_settings(Starting()):
        assert get_current_settings().flows.heartbeat_frequency is None
    with flow_settings(None):
        assert get_current_settings().flows.heartbeat_frequency == default
    assert get_current_settings().flows.heartbeat_frequency == default


FLOW_ON_THE_STARTED_SERVER = """
import os, threading
from visionops.ops.warmstart import ServerGuard, start_prefect_server  # first, as the command
import psutil
from prefect import flow, get_client
from prefect.settings import get_current_settings

server = start_prefect_server()
server.wait()
(guard,) = ServerGuard._running

@flow
def where() -> str:
    with get_client(sync_client=True) as client:
        return str(client.api_url)

seen = []  # a thread started without this one's context sees the settings too
elsewhere = threading.Thread(target=lambda: seen.append(get_current_settings().api.url))
elsewhere.start()
elsewhere.join()
children = sorted(child.pid for child in psutil.Process().children(recursive=True))
print(where(), server.api_url, os.environ["PREFECT_API_URL"], seen[0],
      children == sorted([server.process.pid, guard.process.pid]),
      server.process.pid, guard.process.pid)
"""


def test_the_flow_runs_on_the_server_started_ahead(server_env: dict):
    done = subprocess.run([sys.executable, "-c", FLOW_ON_THE_STARTED_SERVER], env=server_env,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting temporary server on http://127.0.0.1:" in done.stderr
    used, started, in_environment, in_a_thread, only_ours, server, guard = \
        done.stdout.split()[-7:]
    assert used.rstrip("/") == started == in_environment == in_a_thread
    assert only_ours == "True", "no other server (Prefect's own temporary one) was started"
    assert gone(int(server), within=5) and gone(int(guard), within=5), "nothing left behind"


NO_SHARED_SERVER = """
from visionops.io.locks import prefect_server_url
from visionops.ops.warmstart import start_prefect_server

server = start_prefect_server()
server.wait()
print(prefect_server_url())
"""


def test_the_temporary_server_is_no_shared_server(server_env: dict):
    # A lock on it would hold nothing for others, and outlive a run killed outright.
    done = subprocess.run([sys.executable, "-c", NO_SHARED_SERVER], env=server_env,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "None"


SERVER_THEN_WAIT = """
import time
from visionops.ops.warmstart import start_prefect_server

start_prefect_server().wait()
print("answering", flush=True)
time.sleep(300)
"""


def test_the_temporary_server_dies_with_a_process_killed_outright(server_env: dict):
    parent = subprocess.Popen([sys.executable, "-c", SERVER_THEN_WAIT], env=server_env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "answering"
        children = psutil.Process(parent.pid).children()
        (server,) = [child for child in children
                     if child.cmdline()[1:5] == ["-m", "prefect", "server", "start"]]
        (guard,) = [child for child in children if child.pid != server.pid]
        parent.kill()
        parent.wait()
        assert gone(server.pid, within=10), "the server outlived its parent"
        assert gone(guard.pid, within=5), "the guard ends once it stopped the server"
    finally:
        parent.kill()
        parent.wait()


ENDING = """
import atexit, logging, sys
import visionops.cli

folder, how, code = sys.argv[1], sys.argv[2], int(sys.argv[3])
if how == "command":  # what main() does
    visionops.cli.EndWithoutTeardown().code = code

class Teardown:
    def __del__(self, path=folder + "/teardown", open=open):
        open(path, "w").close()

class Closed(logging.Handler):
    def emit(self, record):
        pass

    def close(self):
        open(folder + "/log-closed", "w").close()
        super().close()

logging.getLogger("visionops.test").addHandler(Closed())
kept = Teardown()
atexit.register(lambda: open(folder + "/atexit", "w").close())
sys.stdout.write("buffered")
raise SystemExit(code)
"""


def end(folder: Path, how: str, code: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENDING, str(folder), how, str(code)],
                          capture_output=True, text=True, timeout=120)


def test_the_command_ends_after_atexit_without_the_teardown(tmp_path: Path):
    done = end(tmp_path, "command", 3)

    assert done.returncode == 3, done.stderr
    assert (tmp_path / "atexit").exists(), "atexit handlers still run"
    assert (tmp_path / "log-closed").exists() and done.stdout == "buffered", "all flushed"
    assert not (tmp_path / "teardown").exists(), "module teardown is skipped"


def test_an_importer_of_visionops_ends_as_usual(tmp_path: Path):
    done = end(tmp_path, "library", 0)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "atexit").exists() and (tmp_path / "teardown").exists()
    assert (tmp_path / "log-closed").exists() and done.stdout == "buffered"


def test_the_command_keeps_its_exit_code_and_message(tmp_path: Path):
    command = Path(sys.executable).with_name("visionops")
    done = subprocess.run([str(command), "stage", "nonsense"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 2
    assert "unknown stage 'nonsense'" in done.stderr
