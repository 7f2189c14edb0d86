"""Train the CNN: Adam, EarlyStopping, ModelCheckpoint and TensorBoard, fixed seeds.
Keras and TensorFlow are imported when training starts, not with the flow: a run that
finds nothing to train never pays for them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.preprocess import PreparedData
from visionops.config import AugmentParams, TrainParams

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    epochs_run: int
    checkpoint: Path
    tensorboard_dir: Path
    fit_seconds: float = 0.0
    train_images: int = 0


def distribution_strategy(name: str) -> tf.distribute.Strategy:
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()  # the cluster comes from TF_CONFIG
    return tf.distribute.get_strategy()


def train_model(data: PreparedData, params: TrainParams, augment: AugmentParams,
                work_dir: Path, callbacks: list[keras.callbacks.Callback] = (),
                verbose: int = 2, backup_dir: Path | None = None) -> TrainResult:
    """Train from scratch, or, when `backup_dir` holds the state an interrupted run left
    at its last finished epoch, resume from there; the backup is removed on success."""
    import keras

    from tasks.augment import make_datasets
    from visionops.models import build_model

    keras.utils.set_random_seed(params.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "best.keras"
    tensorboard_dir = work_dir / "tensorboard"
    train_ds, val_ds = make_datasets(data.train.x, data.train.y, data.val.x, data.val.y,
                                     params.batch_size, augment, params.seed)
    with distribution_strategy(params.strategy).scope():
        model = build_model(params.architecture, data.input_shape, len(data.class_names))
        model.compile(optimizer=keras.optimizers.Adam(params.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=params.epochs, verbose=verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss",
                                          patience=params.early_stopping_patience,
                                          restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
            keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)),
            *([keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=True)]
              if backup_dir is not None else []),
            *callbacks,
        ],
    )
    return TrainResult(model=model, history=history.history,
                       epochs_run=len(history.history["loss"]), checkpoint=checkpoint,
                       tensorboard_dir=tensorboard_dir,
                       fit_seconds=time.perf_counter() - started,
                       train_images=len(data.train.y))


@task(name="Train model", cache_policy=NO_CACHE)
def train_task(data: PreparedData, params: TrainParams, augment: AugmentParams, work_dir: Path,
               callbacks: list[keras.callbacks.Callback] = (), backup_dir: Path | None = None
               ) -> TrainResult:
    return train_model(data, params, augment, work_dir, callbacks, backup_dir=backup_dir)
