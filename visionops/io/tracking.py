"""MLflow and git at the edges: experiment set-up, live epoch metrics, lineage."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path

import mlflow

from visionops.core.config import Params


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


# What a retrain's model depends on, beside the data. Two runs that agree on these and on
# the data version train the same model (fixed seeds), so the second trains nothing.
# Not counted: the CLI, the flow, the stack, ingest, the gate (a change to the gate alone
# re-gates the last challenger), registry, tracking, notification, schedule and compute.
MODEL_CODE = ("visionops.core.images", "visionops.core.pipeline", "visionops.core.models",
              "visionops.core.split", "visionops.core.augment", "visionops.core.precision",
              "visionops.core.training")
MODEL_PARAMS = ("data", "split", "augment", "train")


def source_hash(modules: tuple[str, ...]) -> str:
    """A hash of these modules' source files, the same with or without git."""
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode())
        digest.update(Path(importlib.util.find_spec(name).origin).read_bytes())
    return digest.hexdigest()[:16]


def code_version() -> str:
    """A hash of the source that shapes the trained model (MODEL_CODE)."""
    return source_hash(MODEL_CODE)


def _hash(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def params_hash(params: Params) -> str:
    """A hash of the params that shape the trained model (MODEL_PARAMS)."""
    return _hash(params.model_dump(mode="json", include=set(MODEL_PARAMS)))


GATE_CODE = ("visionops.core.gate", "visionops.core.metrics")


def gate_hash(params: Params) -> str:
    """A hash of the gate's params and code: a version gated under others is gated again."""
    return _hash({"params": params.gate.model_dump(mode="json"),
                  "code": source_hash(GATE_CODE)})


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
