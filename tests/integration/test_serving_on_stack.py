"""`visionops serve-model` on the team stack: a version registered and promoted by the
pipeline's writer, served by a process that holds only a reviewer's MLflow account (read
only, from the environment), over the stack's authenticated MLflow and its artifact proxy.
Needs PostgreSQL at VISIONOPS_POSTGRES_URL (default 127.0.0.1:5432, trust auth)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import httpx
from projects import write_params

from visionops.core.demo import write_digits

MODEL = "serving-on-stack"  # its own experiment and registered model: the pipeline's untouched
TINY_VERSIONS = Path(__file__).resolve().parents[1] / "serving" / "tiny_versions.py"


def _tiny_versions():
    """tests/serving/tiny_versions.py: registering tiny versions, running the server."""
    spec = importlib.util.spec_from_file_location("tiny_versions", TINY_VERSIONS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(settings: dict[str, str]) -> dict[str, str]:
    """This process's environment with nothing but the stack's settings added."""
    base = {key: value for key, value in os.environ.items()
            if not key.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}
    return {**base, **settings}


def test_a_reviewer_account_serves_the_champion_the_writer_promoted(team_stack, tmp_path):
    tiny = _tiny_versions()
    write_digits(tmp_path / "images", per_class=2, labels=range(4))
    params_file = write_params(tmp_path, {
        "data": {"image_size": 8, "channels": 1}, "registry": {"model_name": MODEL},
        "mlflow": {"tracking_uri": team_stack.mlflow_url, "experiment_name": MODEL},
        "serving": {"poll_seconds": 0.5}})
    registration = tiny.Registration(params_file, tmp_path / "images", promote="first",
                                     env=_env(team_stack.client_env()), versions=1)
    reviewer = team_stack.person_env()
    server = tiny.ServingProcess(params_file, tmp_path / "server.log", env=_env(reviewer))
    try:
        registered = registration.go().result()
        champion = registered["versions"][0]
        server.wait_version(champion, timeout=120)
        images = sorted((tmp_path / "images").rglob("*.png"))
        answer = httpx.post(server.url + "/predict", timeout=30, files=[
            ("files", (image.name, image.read_bytes(), "image/png")) for image in images[:4]])
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model_name"], body["model_version"]) == (MODEL, champion)
        own = registered["answers"][champion]
        assert [p["label"] for p in body["predictions"]] == [
            own[image.name]["label"] for image in images[:4]]
        assert server.get("/ready").json() == {"status": "ready"}
    finally:
        server.stop()
        registration.stop()
    assert reviewer["MLFLOW_TRACKING_PASSWORD"] not in server.output()
