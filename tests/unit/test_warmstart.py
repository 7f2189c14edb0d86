"""Prefect's temporary server started ahead of the flow, and imports while it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from visionops.ops.warmstart import flow_settings, import_while_waiting, start_prefect_server


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
    starting = threading.Event()
    waiting = threading.Thread(target=starting.wait, daemon=True)
    waiting.start()

    assert import_while_waiting(waiting, ["colorsys", "sched"]) == ["colorsys", "sched"]
    starting.set()
    waiting.join()
    assert import_while_waiting(waiting, ["wave"]) == []
    assert import_while_waiting(None, ["wave"]) == []


def test_nothing_is_started_when_prefect_api_url_names_a_server():
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert start_prefect_server() is None


def test_no_heartbeats_only_for_a_run_on_the_temporary_server():
    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None
    with flow_settings(threading.Thread(target=lambda: None)):
        assert get_current_settings().flows.heartbeat_frequency is None
    with flow_settings(None):
        assert get_current_settings().flows.heartbeat_frequency == default
    assert get_current_settings().flows.heartbeat_frequency == default


FLOW_ON_THE_STARTED_SERVER = """
import time
from prefect import flow, get_client
from prefect.server.api.server import SubprocessASGIServer
from visionops.ops.warmstart import ServerGuard, start_prefect_server

starting = start_prefect_server()
(server,) = SubprocessASGIServer._instances.values()
starting.join()
started_by_us = server.server_process.pid
(guard,) = ServerGuard._running

@flow
def where() -> str:
    with get_client(sync_client=True) as client:
        return str(client.api_url)

print(where(), server.api_url, server.server_process.pid == started_by_us,
      len(SubprocessASGIServer._instances), started_by_us, guard.process.pid)
"""


def test_the_flow_runs_on_the_server_started_ahead(server_env: dict):
    done = subprocess.run([sys.executable, "-c", FLOW_ON_THE_STARTED_SERVER], env=server_env,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    used, started, same_process, servers, server, guard = done.stdout.split()[-6:]
    assert used.rstrip("/") == started and same_process == "True" and servers == "1"
    assert gone(int(server), within=5) and gone(int(guard), within=5), "nothing left behind"


SERVER_THEN_WAIT = """
import time
from visionops.ops.warmstart import start_prefect_server

start_prefect_server().join()
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
                     if "prefect.server.api.server:create_app" in child.cmdline()]
        (guard,) = [child for child in children if child.pid != server.pid]
        parent.kill()
        parent.wait()
        assert gone(server.pid, within=10), "the server outlived its parent"
        assert gone(guard.pid, within=5), "the guard ends once it stopped the server"
    finally:
        parent.kill()
        parent.wait()


def test_prefect_still_has_what_the_guard_relies_on():
    # Prefect's own: the flow finds this per-process instance; its Popen is watched.
    server = SubprocessASGIServer(port=1)
    try:
        assert SubprocessASGIServer._instances[1] is server
        assert server.server_process is None and callable(server.start)
    finally:
        server.stop()
    assert 1 not in SubprocessASGIServer._instances


TEARDOWN_SKIPPED = """
import atexit, sys
import visionops

class Teardown:
    def __del__(self, path=sys.argv[1] + "/teardown", open=open):
        open(path, "w").close()

kept = Teardown()
atexit.register(lambda: open(sys.argv[1] + "/atexit", "w").close())
visionops.end_without_teardown(int(sys.argv[2]))
raise SystemExit(int(sys.argv[2]))
"""


def test_the_command_ends_after_atexit_without_the_teardown(tmp_path: Path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", TEARDOWN_SKIPPED, str(tmp_path), "3"],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 3, done.stderr
    assert (tmp_path / "atexit").exists(), "atexit handlers still run"
    assert not (tmp_path / "teardown").exists(), "module teardown is skipped"
    assert time.monotonic() - started < 30


def test_without_the_command_the_interpreter_tears_down_as_usual(tmp_path: Path):
    script = TEARDOWN_SKIPPED.replace("visionops.end_without_teardown(int(sys.argv[2]))", "")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), "0"],
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "atexit").exists() and (tmp_path / "teardown").exists()
