"""Files into the active MLflow run, retried while the store is away for a moment."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import TRANSIENT_RETRIES
from visionops.io.artifacts import upload


@task(name="Upload to the MLflow run", cache_policy=NO_CACHE, timeout_seconds=30 * 60,
      **TRANSIENT_RETRIES)
def upload_task(files: list[tuple[Path, str]]) -> None:
    upload(files)
