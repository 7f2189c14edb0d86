"""Prefect's temporary server started ahead of the flow, and imports while it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from visionops.warmstart import flow_settings, import_while_waiting, start_prefect_server


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
from visionops.warmstart import start_prefect_server

starting = start_prefect_server()
(server,) = SubprocessASGIServer._instances.values()
starting.join()
started_by_us = server.server_process.pid

@flow
def where() -> str:
    with get_client(sync_client=True) as client:
        return str(client.api_url)

print(where(), server.api_url, server.server_process.pid == started_by_us,
      len(SubprocessASGIServer._instances))
"""


def test_the_flow_runs_on_the_server_started_ahead(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    done = subprocess.run([sys.executable, "-c", FLOW_ON_THE_STARTED_SERVER], env=env,
                          capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    used, started, same_process, servers = done.stdout.split()[-4:]
    assert used.rstrip("/") == started and same_process == "True" and servers == "1"


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
