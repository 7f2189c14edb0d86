"""Files into the active MLflow run's artifacts. On a team server the upload goes
through MLflow's artifact proxy to the object store, so it is retried when the store
or the server is unreachable for a moment."""

from __future__ import annotations

from pathlib import Path

import mlflow


class ArtifactUploadError(RuntimeError):
    """An upload to the run's artifact store failed; the message names the file."""


def upload(files: list[tuple[Path, str]]) -> None:
    """Each (local file or folder, artifact folder) into the active run."""
    for path, artifact_path in files:
        try:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)
        except Exception as exc:
            store = mlflow.get_tracking_uri()
            raise ArtifactUploadError(
                f"could not upload {path} to the artifacts of MLflow run "
                f"{mlflow.active_run().info.run_id} at {store}: {exc}") from exc

