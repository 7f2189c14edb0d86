"""Register the model version, prove it serves, export it, and promote it to champion
(visionops.io.models, visionops.io.exports and visionops.io.registry)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.entities.model_registry import ModelVersion
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.retry import TRANSIENT_RETRIES
from visionops.core.config import ExportParams, Params
from visionops.io.exports import ExportReport, export_model
from visionops.io.models import FreshProcess, check_servable, register_model
from visionops.io.registry import ChampionChanged, Registry


@task(name="Register model version", cache_policy=NO_CACHE,  # not idempotent: no retries
      timeout_seconds=30 * 60)
def register_task(model, model_name: str, sample: np.ndarray, tags: dict[str, str]
                  ) -> ModelVersion:
    return register_model(model, model_name, sample, tags)


@task(name="Check it serves from the registry", cache_policy=NO_CACHE, timeout_seconds=30 * 60)
def servability_task(model_uri: str, tracking_uri: str, sample: np.ndarray,
                     expected: np.ndarray, fresh: FreshProcess | None = None) -> str | None:
    return check_servable(model_uri, tracking_uri, sample, expected, fresh=fresh)


@task(name="Export and check SavedModel, TFLite and ONNX", cache_policy=NO_CACHE,
      timeout_seconds=30 * 60)
def export_task(model, out_dir: Path, sample: np.ndarray, export: ExportParams
                ) -> ExportReport:
    """The formats `export` asks for, each published only if it reproduces the Keras
    model's predictions for `sample` within `export.tolerance`."""
    return export_model(model, out_dir, sample, export.formats, export.tolerance)


@task(name="Promote to champion", timeout_seconds=10 * 60, **TRANSIENT_RETRIES)
def promote_task(params: Params, version: str, reason: str, actor: str,
                 expected_champion: str | None) -> dict:
    """The promotion's event; "refused", with the reason, when the champion is no longer
    `expected_champion`. A retry after a promotion that went through changes nothing."""
    try:
        return Registry(params).promote(version, reason, actor,
                                        expected_champion=expected_champion)
    except ChampionChanged as exc:
        return {"event": "refused", "reason": str(exc), "to_version": str(version)}
