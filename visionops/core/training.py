"""Train the CNN: Adam, EarlyStopping, ModelCheckpoint and TensorBoard, fixed seeds.
Keras and TensorFlow are imported when training starts, not with the flow: a run that
finds nothing to train never pays for them.

An interrupted fit resumes from a backup of its last finished epoch (Keras's
BackupAndRestore, keeping the previous epoch's state too). A backup that does not load
is discarded with a warning, and training starts again from scratch."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from visionops.core.config import AugmentParams, TrainParams
from visionops.core.split import PreparedData

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    epochs_run: int
    checkpoint: Path
    tensorboard_dir: Path
    fit_seconds: float = 0.0
    train_images: int = 0
    resumed_from_epoch: int = 0  # epochs the backup had already finished; 0: from scratch
    backup_warning: str | None = None  # why a backup was discarded, when one was




def distribution_strategy(name: str) -> tf.distribute.Strategy:
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()  # the cluster comes from TF_CONFIG
    return tf.distribute.get_strategy()


def train_model(data: PreparedData, params: TrainParams, augment: AugmentParams,
                work_dir: Path, callbacks: list[keras.callbacks.Callback] = (),
                verbose: int = 2, backup_dir: Path | None = None,
                log: logging.Logger | logging.LoggerAdapter = logger) -> TrainResult:
    """Train from scratch, or, when `backup_dir` holds the state an interrupted run left
    at its last finished epoch, resume from there; the backup is removed on success.
    A backup that does not load is removed first, and the reason is `backup_warning`."""
    import keras

    from visionops.core.augment import make_datasets
    from visionops.core.models import build_model

    def compiled_model() -> keras.Model:
        model = build_model(params.architecture, data.input_shape, len(data.class_names))
        model.compile(optimizer=keras.optimizers.Adam(params.learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    resumed_from, backup_warning = 0, None
    if backup_dir is not None:
        # before the seed is set, so that checking the backup draws no random numbers
        resumed_from, backup_warning = check_backup(backup_dir, compiled_model)
        if backup_warning:
            log.warning(backup_warning)
        elif resumed_from:
            log.info("resuming after epoch %s from the backup in %s", resumed_from,
                     backup_dir)
    keras.utils.set_random_seed(params.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "best.keras"
    tensorboard_dir = work_dir / "tensorboard"
    train_ds, val_ds = make_datasets(data.train.x, data.train.y, data.val.x, data.val.y,
                                     params.batch_size, augment, params.seed)
    with distribution_strategy(params.strategy).scope():
        model = compiled_model()
    started = time.perf_counter()
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=params.epochs, verbose=verbose,
        callbacks=[
            keras.callbacks.EarlyStopping(monitor="val_loss",
                                          patience=params.early_stopping_patience,
                                          restore_best_weights=True),
            keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
            keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)),
            *([backup_callback(backup_dir)] if backup_dir is not None else []),
            *callbacks,
        ],
    )
    return TrainResult(model=model, history=history.history,
                       epochs_run=len(history.history.get("loss", [])), checkpoint=checkpoint,
                       tensorboard_dir=tensorboard_dir,
                       fit_seconds=time.perf_counter() - started,
                       train_images=len(data.train.y), resumed_from_epoch=resumed_from,
                       backup_warning=backup_warning)


def backup_callback(backup_dir: Path) -> keras.callbacks.BackupAndRestore:
    """Backs up every finished epoch, keeping the one before as well, so that a backup
    half-written when the process died falls back to the previous epoch."""
    import keras

    return keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True,
                                            delete_checkpoint=True)


def check_backup(backup_dir: Path, compiled_model: Callable[[], keras.Model]
                 ) -> tuple[int, str | None]:
    """Restore `backup_dir` into a throwaway model, as `fit` will: (the epoch it resumes
    after, None), or, when it does not load, remove it and return (0, the reason)."""
    if not backup_dir.exists():
        return 0, None
    model = compiled_model()
    callback = backup_callback(backup_dir)
    callback.set_model(model)
    try:
        callback.on_train_begin()  # Keras falls back to the previous epoch's state itself
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, it is unusable
        shutil.rmtree(backup_dir, ignore_errors=True)
        return 0, (f"training backup {backup_dir} could not be restored "
                   f"({type(exc).__name__}: {exc}); discarded it and trained from scratch")
    # where BackupAndRestore tells `fit` to start; Keras has no public name for it
    return int(getattr(model, "_initial_epoch", None) or 0), None


@contextlib.contextmanager
def claim_backup_dir(base: Path, lineage_key: str) -> Iterator[Path]:
    """The backup folder for one run of a lineage: `base/<lineage_key>`, where a crashed
    run of the same lineage left its backup, while no live run holds it; otherwise a
    private `base/<lineage_key>-<pid>-<random>`, removed on exit. The claim is an
    exclusive lock the OS releases when its process dies, so a crash never blocks."""
    base.mkdir(parents=True, exist_ok=True)
    remove_abandoned_private_dirs(base, lineage_key)
    with _exclusive_lock(base / f"{lineage_key}.lock") as claimed:
        if claimed:
            yield base / lineage_key
            return
    private = base / f"{lineage_key}-{os.getpid()}-{secrets.token_hex(4)}"
    with _exclusive_lock(private.with_name(private.name + ".lock")):
        try:
            yield private
        finally:
            shutil.rmtree(private, ignore_errors=True)
            private.with_name(private.name + ".lock").unlink(missing_ok=True)


def remove_abandoned_private_dirs(base: Path, lineage_key: str) -> None:
    """Remove the private backup folders of runs that died holding them: nobody resumes
    those."""
    private_lock = re.compile(rf"{re.escape(lineage_key)}-\d+-[0-9a-f]+\.lock")
    for lock in base.iterdir():
        if not private_lock.fullmatch(lock.name):
            continue
        with _exclusive_lock(lock) as claimed:
            if claimed:
                shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on `path` for the block if nobody else holds it: True;
    False when another open file, in this process or any other, holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except FileNotFoundError:  # removed by another cleaner meanwhile
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claimed = False
        else:
            claimed = True
        yield claimed
    finally:
        os.close(fd)  # closing releases the lock
