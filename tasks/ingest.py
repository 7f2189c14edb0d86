"""Ingest a landing area into the dataset (visionops.io.ingest)."""

from __future__ import annotations

from prefect import task

from tasks.retry import TRANSIENT_RETRIES
from visionops.core.config import Params
from visionops.io.ingest import IngestResult, ingest


@task(name="Ingest from landing area", timeout_seconds=2 * 60 * 60, **TRANSIENT_RETRIES)
def ingest_task(source: str, params: Params) -> IngestResult:
    return ingest(source, params)
