"""MLflow and git at the edges: experiment set-up, live epoch metrics, lineage."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import mlflow

from visionops.config import Params


def use_experiment(params: Params) -> str:
    """Point MLflow at the configured store and return the experiment id, creating the
    experiment (with local artifacts for a local store) the first time."""
    mlflow.set_tracking_uri(params.tracking_uri)
    experiment = mlflow.get_experiment_by_name(params.mlflow.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    local_store = params.tracking_uri.startswith(("sqlite:", "file:", "/"))
    return mlflow.create_experiment(
        params.mlflow.experiment_name,
        artifact_location=params.artifact_location if local_store else None)


def epoch_metrics_logger():
    """A Keras callback that logs every epoch's metrics in one MLflow call, so the UI
    shows progress live. Built when training starts: importing Keras takes seconds that
    a run with nothing to train should not pay."""
    import keras

    class EpochMetricsLogger(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs:
                mlflow.log_metrics({k: float(v) for k, v in logs.items()}, step=epoch)

    return EpochMetricsLogger()


PACKAGES = ("visionops", "tasks", "flows")


def code_version() -> str:
    """A hash of the pipeline's own source (the packages that define what a retrain does),
    the same with or without git."""
    digest = hashlib.sha256()
    top = Path(__file__).resolve().parents[1]
    for package in PACKAGES:
        for source in sorted((top / package).rglob("*.py")):
            digest.update(source.relative_to(top).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def params_hash(params: Params) -> str:
    """A hash of every param a retrain reads."""
    text = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    """HEAD's sha, with `-dirty` when tracked files differ from it; `unknown` outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
