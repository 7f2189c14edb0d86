"""The retrain deployment on a real Prefect server with a real process worker: deploy
from prefect.yaml, read the schedule back, trigger a run, let the worker run it, and
find the champion in MLflow. Also `visionops serve`. No mocks of Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from projects import REPO, make_project

from visionops.ops import processes
from visionops.ops.objectstore import free_port

BIN = Path(sys.executable).parent


def _api(url: str, path: str, body: dict | None = None, attempts: int = 5):
    """One call to the server's REST API; a 503 (its SQLite store busy under a loaded
    machine: seen once in a full run) is asked again, as Prefect's own client does."""
    request = urllib.request.Request(
        url + path, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(2)


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on a free loopback port, stopped by its PID after."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host",
                                   "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _api(url, "/health"), 120, "the Prefect server")
        yield url, env
    finally:
        processes.stop(server.pid)


def _prefect(env, *args: str) -> str:
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_prefect_yaml_schedule_matches_params_yaml():
    deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    schedule = yaml.safe_load((REPO / "params.yaml").read_text())["schedule"]
    assert deployment["schedules"][0] == {"cron": schedule["cron"],
                                          "timezone": schedule["timezone"]}


def test_deployed_retrain_runs_on_a_worker_and_registers_a_champion(prefect_api,
                                                                    tmp_path):
    url, env = prefect_api
    project = make_project(tmp_path / "project")
    _prefect(env, "work-pool", "create", "visionops", "--type", "process")
    for name in ("nightly", "scoring"):  # one at a time: `deploy --all` ignores --params
        _prefect(env, "--no-prompt", "deploy", "--name", name, "--params",
                 json.dumps({"params_path": str(project / "params.yaml")}))
    scoring = _api(url, "/deployments/name/score/scoring")
    assert [s["schedule"]["cron"] for s in scoring["schedules"]] == ["0 6 * * *"]
    assert scoring["work_pool_name"] == "visionops", scoring
    assert scoring["global_concurrency_limit"]["limit"] == 1, scoring
    assert scoring["parameters"] == {"params_path": str(project / "params.yaml")}

    deployment = _api(url, "/deployments/name/retrain/nightly")
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert deployment["work_pool_name"] == "visionops"

    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool",
                                   "visionops"], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:  # two runs at once: the deployment's concurrency limit makes the second wait
        ids = [_api(url, f"/deployments/{deployment['id']}/create_flow_run", {})["id"]
               for _ in range(2)]
        runs = [_wait(lambda run_id=run_id: (lambda r: r if r["state"]["type"] in (
            "COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None)(
            _api(url, f"/flow_runs/{run_id}")), 600, "the flow runs") for run_id in ids]
    finally:
        processes.stop(worker.pid)
    assert [r["state"]["type"] for r in runs] == ["COMPLETED"] * 2, \
        (tmp_path / "worker.log").read_text()[-3000:]
    first, second = sorted(runs, key=lambda r: r["start_time"])
    assert second["start_time"] >= first["end_time"], "the two retrains overlapped"

    champion = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_model_version_by_alias(
        "tiny-digits", "champion")
    assert champion.tags["decision"] == "first_champion"


def test_visionops_serve_registers_its_schedule(prefect_api, tmp_path):
    url, env = prefect_api
    project = make_project(tmp_path / "project")
    with (tmp_path / "serve.log").open("wb") as log:
        serving = subprocess.Popen([str(BIN / "visionops"), "serve", "--params",
                                    str(project / "params.yaml")], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deployment = _wait(lambda: _api(url, "/deployments/name/retrain/serve"), 120,
                           "the served deployment")
    finally:
        processes.stop(serving.pid)
    (schedule,) = deployment["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"]) == (
        "0 2 * * *", "UTC")
    assert deployment["parameters"] == {"params_path": str(project / "params.yaml")}
