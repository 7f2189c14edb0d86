"""Fixtures for the flow and CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from projects import make_project


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
