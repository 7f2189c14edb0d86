"""The Kubernetes deployment declares the same flow as the process-pool one that the
deployment tests run for real."""

from __future__ import annotations

import yaml
from projects import REPO


def test_kubernetes_deployment_matches_the_process_pool_one():
    process = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]
    k8s = yaml.safe_load((REPO / "infra" / "kubernetes" / "prefect.yaml").read_text())
    (deployment,) = k8s["deployments"]
    for key in ("entrypoint", "parameters", "schedules", "concurrency_limit"):
        assert deployment[key] == process[key], key
    assert deployment["work_pool"]["job_variables"]["image"] == "{{ $VISIONOPS_IMAGE }}"
    (step,) = k8s["pull"]
    workdir = step["prefect.deployments.steps.set_working_directory"]["directory"]
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    assert f"WORKDIR {workdir}" in dockerfile
    for package in ("visionops", "tasks", "flows"):
        assert f"COPY {package} {package}" in dockerfile
