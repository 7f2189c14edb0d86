"""The team stack for real: `visionops stack up` (SeaweedFS S3, MLflow server with basic
auth on PostgreSQL, Prefect server on PostgreSQL, a process worker), the retrain flow run
against it by configuration only, auth, an object-store outage mid-run, and a teardown
that leaves no process behind. Needs PostgreSQL at VISIONOPS_POSTGRES_URL (default
127.0.0.1:5432, trust auth)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from projects import write_params

from visionops.ops.stack import BUCKETS, SERVICES, Stack

BIN = Path(sys.executable).parent
MODEL = "tiny-digits"


def _visionops(*args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run([str(BIN / "visionops"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def _client_env(stack: Stack) -> dict[str, str]:
    """This process's environment with nothing but the stack's client settings added."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    return {**base, **stack.client_env()}


def _mlflow(stack: Stack, path: str, body: dict | None = None, role: str | None = "reviewer",
            auth: tuple[str, str] | None = None) -> requests.Response:
    auth = auth or (stack.user(role) if role else None)
    if body is None:
        return requests.get(stack.mlflow_url + path, auth=auth, timeout=30)
    return requests.post(stack.mlflow_url + path, json=body, auth=auth, timeout=30)


def _champion(stack: Stack) -> str | None:
    answer = _mlflow(stack, f"/api/2.0/mlflow/registered-models/alias?name={MODEL}"
                            "&alias=champion")
    return answer.json()["model_version"]["version"] if answer.ok else None


@pytest.fixture(scope="module")
def stack(team_stack) -> Stack:
    return team_stack


def test_status_reports_every_part_up(stack):
    done = _visionops("stack", "status", "--project", str(stack.project), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert all(status[name]["healthy"] for name in SERVICES), status


def test_retrain_runs_against_the_stack_by_configuration_only(stack):
    project = stack.project
    env = _client_env(stack)
    # The dataset lives on the stack's DVC remote only: the flow has to pull it.
    dvc = [str(BIN / "dvc")]
    for command in (["add", "data"], ["push"]):
        done = subprocess.run([*dvc, *command], cwd=project, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")

    done = _visionops("retrain", "--params", str(project / "params.yaml"), "--json", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["tracking_uri"] == stack.mlflow_url
    assert sorted(p.name for p in (project / "data").iterdir()) == ["0", "1", "2"]

    # Run and registry in the PostgreSQL-backed server, champion alias set.
    run = _mlflow(stack, f"/api/2.0/mlflow/runs/get?run_id={summary['run_id']}").json()["run"]
    assert run["info"]["status"] == "FINISHED"
    assert _champion(stack) == summary["champion_version"] == summary["model_version"]

    # Artifacts and the dataset found in the buckets, listed with boto3.
    s3 = stack.object_store().client()
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=BUCKETS["mlflow"]) for item in page.get("Contents", [])]
    run_keys = [key for key in keys if f"/{summary['run_id']}/artifacts/" in key]
    assert any("validation/" in key for key in run_keys)
    assert any("gate/decision.json" in key for key in run_keys)
    assert any(key.endswith("MLmodel") for key in keys)
    dataset_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    stored = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKETS["dvc"])["Contents"]}
    assert f"store/files/md5/{dataset_md5[:2]}/{dataset_md5[2:]}" in stored

    # The flow run is on the Prefect server.
    runs = stack.prefect_session().post(stack.prefect_api_url + "/flow_runs/filter",
                                        json={}, timeout=30).json()
    assert [r["state_type"] for r in runs if r["name"] in done.stdout] == ["COMPLETED"]


def test_auth_refuses_the_anonymous_and_read_only_users(stack):
    search = "/api/2.0/mlflow/experiments/search?max_results=5"
    assert _mlflow(stack, search, role=None).status_code == 401
    assert _mlflow(stack, search, auth=(stack.user("writer")[0], "wrong")).status_code == 401
    experiments = _mlflow(stack, search).json()["experiments"]
    tiny = next(e for e in experiments if e["name"] == "tiny")

    refused = _mlflow(stack, "/api/2.0/mlflow/runs/create",
                      {"experiment_id": tiny["experiment_id"]})
    assert refused.status_code == 403
    version = _champion(stack)
    assert _mlflow(stack, "/api/2.0/mlflow/registered-models/alias",
                   {"name": MODEL, "alias": "champion", "version": version}).status_code == 403
    assert _mlflow(stack, "/api/2.0/mlflow/runs/create", {"experiment_id": tiny[
        "experiment_id"]}, role="writer").status_code == 200


def _wait_for_training(stack: Stack, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until the running retrain has logged its first epoch."""
    deadline = time.monotonic() + timeout
    experiments = _mlflow(stack, "/api/2.0/mlflow/experiments/search?max_results=5").json()
    ids = [e["experiment_id"] for e in experiments["experiments"]]
    while time.monotonic() < deadline and process.poll() is None:
        runs = _mlflow(stack, "/api/2.0/mlflow/runs/search", {
            "experiment_ids": ids, "filter": "attributes.status = 'RUNNING'"}).json()
        for run in runs.get("runs", []):
            if any(m["key"] == "loss" for m in run["data"].get("metrics", [])):
                return
        time.sleep(0.3)
    raise AssertionError("the retrain never reached training: " + process.stdout.read()[-3000:])


def test_object_store_outage_mid_run_fails_clearly_and_a_rerun_succeeds(stack):
    project = stack.project
    champion = _champion(stack)
    assert champion is not None
    write_params(project, {"train": {"epochs": 30, "batch_size": 16, "learning_rate": 0.003,
                                     "early_stopping_patience": 30}})
    env = _client_env(stack)
    command = [str(BIN / "visionops"), "retrain", "--params", str(project / "params.yaml")]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_training(stack, process)
        down = _visionops("stack", "down", "--project", str(project), "--only", "s3")
        assert down.returncode == 0, down.stderr
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "Retry 1/3" in output and "Retries are exhausted" in output, output[-4000:]
    assert "could not upload" in output and "Flow run" in output
    assert _champion(stack) == champion

    up = _visionops("stack", "up", "--project", str(project))
    assert up.returncode == 0, up.stdout + up.stderr
    rerun = _visionops("retrain", "--params", str(project / "params.yaml"), "--json", env=env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["model_version"] is not None and summary["decision"]
