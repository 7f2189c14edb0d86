"""Train the model (visionops.core.training)."""

from __future__ import annotations

from pathlib import Path

import keras
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from visionops.core.config import AugmentParams, TrainParams
from visionops.core.split import PreparedData
from visionops.core.training import TrainResult, train_model


@task(name="Train model", cache_policy=NO_CACHE, timeout_seconds=8 * 60 * 60)
def train_task(data: PreparedData, params: TrainParams, augment: AugmentParams, work_dir: Path,
               callbacks: list[keras.callbacks.Callback] = (), backup_dir: Path | None = None,
               cache: Path | None = None, shuffle_buffer: int = 1_000) -> TrainResult:
    return train_model(data, params, augment, work_dir, callbacks, backup_dir=backup_dir,
                       log=get_run_logger(), cache=cache, shuffle_buffer=shuffle_buffer)
