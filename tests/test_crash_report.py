"""Crashed runs are reported like failed ones, exactly once: by their own on_crashed hook
when the process sees its end (SIGTERM), by the next run when it does not (SIGKILL)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL
from prefect.states import Crashed, Running

from flows.hooks import (
    REPORTED_TAG,
    ZOMBIE_AUTOMATION,
    crash_runs_whose_heartbeats_stop,
    failed_steps,
    record_process,
    report_failure,
    report_unreported_crashes,
    this_process,
)
from visionops.core.config import load_params

REPO = Path(__file__).resolve().parents[1]

NIGHTLY_RUN = """
import sys, time
from prefect import flow, task
from prefect.runtime import flow_run
from flows.hooks import record_process, report_failure

@task(name="Sleep through the night")
def sleep() -> None:
    print("running", flow_run.get_id(), flush=True)
    time.sleep(120)

@flow(name=sys.argv[2], on_running=[record_process] if sys.argv[3] == "record" else [],
      on_crashed=[report_failure])
def nightly(params_path: str) -> None:
    sleep()

nightly(params_path=sys.argv[1])
"""


class Webhook(http.server.ThreadingHTTPServer):
    """A real HTTP endpoint on this machine that keeps every JSON body posted to it."""

    def __init__(self):
        self.posts: list[dict] = []
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                webhook.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture
def webhook():
    server = Webhook()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def params_path(tmp_path: Path, webhook: Webhook) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"notify": {"webhook_url": webhook.url}}))
    return path


def start_night(params_path: Path, flow_name: str, record: bool) -> tuple[subprocess.Popen, str]:
    """A run of its own flow in another process, on the test server, once its task runs."""
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    night = subprocess.Popen(
        [sys.executable, "-c", NIGHTLY_RUN, str(params_path), flow_name,
         "record" if record else "no"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    for line in night.stdout:
        if line.startswith("running "):
            return night, line.split()[1]
    night.wait(timeout=60)
    raise AssertionError(f"the run never started (exit code {night.returncode})")


def wait_for_the_task_run(flow_run_id: str) -> None:
    """Task runs reach the server as events, a moment after they start."""
    deadline = time.monotonic() + 20
    while not failed_steps(uuid.UUID(flow_run_id)):
        assert time.monotonic() < deadline, "the task run was never recorded"
        time.sleep(0.2)


def read_run(flow_run_id: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(flow_run_id))


def reports(params_path: Path) -> list[Path]:
    return sorted((params_path.parent / "reports" / "failures").glob("*.md"))


def test_a_run_killed_outright_is_reported_once_by_the_next_run(
        prefect_server, params_path: Path, webhook: Webhook):
    flow_name = f"nightly-{uuid.uuid4().hex[:8]}"
    night, run_id = start_night(params_path, flow_name, record=True)
    wait_for_the_task_run(run_id)
    night.kill()
    night.wait()
    assert read_run(run_id).state.is_running(), "nobody was left to say it ended"

    params = load_params(params_path)
    name = read_run(run_id).name
    assert report_unreported_crashes(params, flow_name) == [name]
    assert report_unreported_crashes(params, flow_name) == []

    run = read_run(run_id)
    assert run.state.is_crashed() and REPORTED_TAG in run.tags
    (report,) = reports(params_path)
    assert report.name == f"{name}.md"
    text = report.read_text()
    assert "crashed" in text and run_id in text and "Sleep through the night" in text
    assert "process" in text and "is gone" in text
    (post,) = webhook.posts
    assert post["flow_run_id"] == run_id and post["state"] == "Crashed"
    assert post["failed_step"] == "Sleep through the night"


def test_a_run_the_server_found_crashed_is_reported_once_by_the_next_run(
        prefect_server, params_path: Path, webhook: Webhook):
    flow_name = f"nightly-{uuid.uuid4().hex[:8]}"
    night, run_id = start_night(params_path, flow_name, record=False)
    night.kill()
    night.wait()
    params = load_params(params_path)
    assert report_unreported_crashes(params, flow_name) == [], \
        "a Running run without a recorded process may still be running elsewhere"

    # What the server's automation does once the run's heartbeats stop.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(uuid.UUID(run_id), Crashed(message="no heartbeat"),
                                  force=True)
    assert report_unreported_crashes(params, flow_name) == [read_run(run_id).name]
    assert report_unreported_crashes(params, flow_name) == []

    assert len(reports(params_path)) == 1 and "no heartbeat" in reports(params_path)[0].read_text()
    assert [post["flow_run_id"] for post in webhook.posts] == [run_id]


def test_a_run_that_sees_its_crash_reports_it_itself_and_only_once(
        prefect_server, params_path: Path, webhook: Webhook):
    flow_name = f"nightly-{uuid.uuid4().hex[:8]}"
    night, run_id = start_night(params_path, flow_name, record=True)
    night.send_signal(signal.SIGTERM)
    assert night.wait(timeout=60) != 0

    run = read_run(run_id)
    assert run.state.is_crashed() and REPORTED_TAG in run.tags
    (report,) = reports(params_path)
    assert "crashed" in report.read_text()
    assert [post["flow_run_id"] for post in webhook.posts] == [run_id]

    assert report_unreported_crashes(load_params(params_path), flow_name) == []
    assert len(reports(params_path)) == 1 and len(webhook.posts) == 1


def test_a_step_that_hangs_is_stopped_by_its_timeout_and_reported(
        prefect_server, params_path: Path, webhook: Webhook):
    @task(name="Hang", timeout_seconds=1)
    def hang() -> None:
        for _ in range(300):
            time.sleep(0.1)

    @flow(name=f"nightly-{uuid.uuid4().hex[:8]}", on_failure=[report_failure])
    def nightly(params_path: str) -> None:
        hang()

    started = time.monotonic()
    state = nightly(params_path=str(params_path), return_state=True)

    assert state.is_failed() and time.monotonic() - started < 20
    (report,) = reports(params_path)
    assert "failed" in report.read_text() and "timed out after 1" in report.read_text()
    (post,) = webhook.posts
    assert post["state"] == "TimedOut" and "TimeoutError" in post["reason"]


def test_the_server_is_told_once_to_crash_runs_whose_heartbeats_stop(prefect_server):
    assert crash_runs_whose_heartbeats_stop(heartbeat_s=60, missed=3) is True
    try:
        assert crash_runs_whose_heartbeats_stop() is False
        with get_client(sync_client=True) as client:
            (automation,) = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        assert automation.enabled and automation.trigger.within.total_seconds() == 180
        assert automation.actions[0].state == StateType.CRASHED
    finally:
        with get_client(sync_client=True) as client:
            for created in client.read_automations_by_name(ZOMBIE_AUTOMATION):
                client.delete_automation(created.id)


def test_a_run_retried_in_a_new_process_is_judged_by_that_process(prefect_server,
                                                                    params_path: Path):
    flow_name = f"nightly-{uuid.uuid4().hex[:8]}"

    @flow(name=flow_name)
    def nightly() -> None:
        pass

    first_try = subprocess.Popen([sys.executable, "-c", "pass"])
    first_try.wait()  # the process of the run's first try: gone
    gone = replace(this_process(), pid=first_try.pid)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(nightly, tags=[gone.tag()], state=Running())
    # The retry, in this process, enters Running and then tags the run: a scan in between
    # must wait for that tag rather than judge the run by its first try's process.
    retry = threading.Timer(1.0, record_process, args=(None, run, None))
    retry.start()

    assert report_unreported_crashes(load_params(params_path), flow_name) == []

    retry.join()
    assert read_run(str(run.id)).state.is_running()
    assert reports(params_path) == []
