"""Fixtures for the flow, CLI, integration and security tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from projects import make_project, visionops, write_params


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (its own database) for every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory, prefect_server) -> tuple[Path, dict]:
    """A project whose first retrain has run: (folder, that run's summary)."""
    from flows.retrain import retrain

    root = make_project(tmp_path_factory.mktemp("trained") / "project")
    summary = retrain(params_path=str(root / "params.yaml"))
    return root, summary


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory):
    """The whole team stack (`visionops stack up`) on free ports and databases of its own,
    shared by the integration and security tests and purged at the end; every process it
    started must be gone. Needs PostgreSQL at VISIONOPS_POSTGRES_URL (default
    127.0.0.1:5432, trust auth)."""
    from visionops.ops import processes
    from visionops.ops.stack import SERVICES, Stack

    project = make_project(tmp_path_factory.mktemp("team") / "project", labels=range(3),
                           per_class=20)
    write_params(project, {"train": {"epochs": 6, "batch_size": 16, "learning_rate": 0.003,
                                     "early_stopping_patience": 6}})
    up = visionops("stack", "up", "--project", str(project), "--s3-port", "0",
                   "--mlflow-port", "0", "--prefect-port", "0",
                   "--db-prefix", f"visionops_it{os.getpid()}")
    stack = Stack.load(project)
    started = dict(stack.pids)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert set(started) == set(SERVICES)
        yield stack
    finally:
        down = visionops("stack", "down", "--project", str(project), "--purge")
        pids = {**started, **Stack.load(project).pids}
        leftover = {name: processes.group_members(pid) for name, pid in pids.items()}
        assert down.returncode == 0, down.stdout + down.stderr
        assert not any(leftover.values()), f"processes left behind: {leftover}"
        assert not (project / ".stack").exists()
