"""Train the model: Adam, EarlyStopping (best weights restored), TensorBoard, fixed
seeds; the trained model saved once as `best.keras`.
Keras and TensorFlow are imported when training starts, not with the flow: a run that
finds nothing to train never pays for them.

An interrupted fit resumes from a backup of its last finished epoch (Keras's
BackupAndRestore, keeping the previous epoch's state too). A backup that does not load
is discarded with a warning, and training starts again from scratch."""

from __future__ import annotations

import contextlib
import json
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
from visionops.core.flock import exclusive_lock
from visionops.core.split import PreparedData

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

logger = logging.getLogger(__name__)
# Training steps per call into TensorFlow: small models on small images spend much of a
# step in Keras's Python loop otherwise. Callbacks see every epoch either way.
STEPS_PER_EXECUTION = 64


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
    precision: str = "float32"  # the dtype policy trained under (`auto` resolved)
    fine_tuned_epochs: int = 0  # of epochs_run, those of the fine-tuning phase
    augmented_samples: Path | None = None  # a grid of what augmentation showed the model
    cached: bool = False  # decoded images read from the on-disk cache


def distribution_strategy(name: str) -> tf.distribute.Strategy:
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()  # the cluster comes from TF_CONFIG
    return tf.distribute.get_strategy()


def training_datasets(data: PreparedData, batch_size: int, augment: AugmentParams, seed: int,
                      shuffle_buffer: int = 1_000, cache: Path | None = None
                      ) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Shuffled (and augmented) training batches and validation batches, streamed from
    the files as raw pixels; with `cache`, decoded images are kept in that folder."""
    import tensorflow as tf

    from visionops.core.augment import build_augmenter
    from visionops.core.pipeline import image_dataset

    def split(name: str, shuffle_seed: int | None) -> tf.data.Dataset:
        part = getattr(data, name)
        return image_dataset(data.files(name), data.image_size, data.channels, batch_size,
                             part.y, shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
                             cache_dir=cache)

    train = split("train", seed)
    augmenter = build_augmenter(augment, seed)
    if augmenter is not None:
        train = train.map(lambda x, y: (augmenter(x, training=True), y),
                          num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    return train, split("val", None)


def train_model(data: PreparedData, params: TrainParams, augment: AugmentParams,
                work_dir: Path, callbacks: list[keras.callbacks.Callback] = (),
                verbose: int = 2, backup_dir: Path | None = None,
                log: logging.Logger | logging.LoggerAdapter = logger,
                cache: Path | None = None, shuffle_buffer: int = 1_000) -> TrainResult:
    """Train from scratch, or, when `backup_dir` holds the state an interrupted run left
    at its last finished epoch, resume from there; the backup is removed on success.
    A backup that does not load is removed first, and the reason is `backup_warning`.

    A keras.applications backbone trains in two phases: the head with the backbone
    frozen, then, with `fine_tune.unfreeze_from` set, the backbone's top layers at
    `fine_tune.learning_rate`. `cache` is a folder for decoded images (see
    `visionops.core.pipeline.claim_cache`); a cache another run holds is not used."""
    from visionops.core.pipeline import claim_cache
    from visionops.core.precision import precision_policy, resolve_precision

    precision = resolve_precision(params.precision)
    with precision_policy(precision), \
            (claim_cache(cache) if cache else contextlib.nullcontext()) as cache:
        result = _train(data, params, augment, work_dir, list(callbacks), verbose,
                        backup_dir, log, cache, shuffle_buffer)
    result.precision, result.cached = precision, cache is not None
    return result


def _train(data, params, augment, work_dir, callbacks, verbose, backup_dir, log, cache,
           shuffle_buffer) -> TrainResult:
    import keras

    from visionops.core.models import build_model, freeze_backbone, unfreeze_top

    # build_model refuses pretrained weights for a model without a backbone
    transfer = params.pretrained is not None
    fine_tune = transfer and params.fine_tune.unfreeze_from is not None
    backup_warning = None

    def compiled_model(phase: int = 1) -> keras.Model:
        model = build_model(params, data.input_shape, len(data.class_names))
        rate = params.learning_rate
        if phase == 1 and transfer:
            freeze_backbone(model)  # the head first; a random backbone trains whole
        if phase == 2:
            unfreeze_top(model, params.fine_tune.unfreeze_from)
            rate = params.fine_tune.learning_rate
        model.compile(optimizer=keras.optimizers.Adam(rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                      steps_per_execution=STEPS_PER_EXECUTION)
        return model

    def resume(folder: Path | None, phase: int) -> int:
        nonlocal backup_warning
        if folder is None:
            return 0
        # before the seed is set, so that checking the backup draws no random numbers
        resumed, warning = check_backup(folder, lambda: compiled_model(phase))
        if warning:
            log.warning(warning)
            backup_warning = warning
        elif resumed:
            log.info("resuming after epoch %s from the backup in %s", resumed, folder)
        return resumed

    phase_one = backup_dir and backup_dir / "phase1"
    finished = backup_dir and backup_dir / "phase1-finished.weights.h5"
    # written last, so that it names a complete weights file: {"epochs", "history"}
    finished_record = backup_dir and backup_dir / "phase1-finished.json"
    done = None
    if finished_record and finished_record.is_file():
        try:
            done = json.loads(finished_record.read_text())
        except (OSError, ValueError) as exc:
            backup_warning = (f"training backup {finished_record} could not be read ({exc}); "
                              "discarded it and trained the first phase again")
            log.warning(backup_warning)
            shutil.rmtree(backup_dir, ignore_errors=True)
    resumed_from = 0 if done else resume(phase_one, 1)
    keras.utils.set_random_seed(params.seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "best.keras"
    tensorboard_dir = work_dir / "tensorboard"
    train_ds, val_ds = training_datasets(data, params.batch_size, augment, params.seed,
                                         shuffle_buffer, cache)

    def fit(model, epochs: int, backup: Path | None, initial_epoch: int = 0) -> dict:
        return model.fit(
            train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch,
            verbose=verbose, callbacks=[
                keras.callbacks.EarlyStopping(monitor="val_loss",
                                              patience=params.early_stopping_patience,
                                              restore_best_weights=True),
                keras.callbacks.TensorBoard(log_dir=str(tensorboard_dir)),
                *([backup_callback(backup)] if backup is not None else []),
                *callbacks,
            ]).history

    started = time.perf_counter()
    # Again just before the weights are drawn: Keras draws their seeds from Python's global
    # `random`, which another thread of this process (Prefect's) may draw from meanwhile.
    keras.utils.set_random_seed(params.seed)
    with distribution_strategy(params.strategy).scope():
        model = compiled_model()
    if done:  # phase 1 ended before the run was interrupted
        model.load_weights(finished)
        history, first_phase_epochs = done["history"], done["epochs"]
        log.info("resuming after the first phase, whose weights %s kept", finished)
    else:
        history = fit(model, params.epochs, phase_one)
        first_phase_epochs = resumed_from + len(history.get("loss", []))
    fine_tuned = 0
    if fine_tune:
        if backup_dir is not None and not done:  # phase 2 resumes from here if killed now
            _write_atomically(finished, lambda path: model.save_weights(path))
            record = json.dumps({"epochs": first_phase_epochs, "history": history})
            _write_atomically(finished_record, lambda path: path.write_text(record))
        weights = model.get_weights()
        phase_two = backup_dir and backup_dir / "phase2"
        resumed_from = resumed_from or resume(phase_two, 2)
        with distribution_strategy(params.strategy).scope():
            model = compiled_model(phase=2)
        model.set_weights(weights)
        more = fit(model, first_phase_epochs + params.fine_tune.epochs, phase_two,
                   initial_epoch=first_phase_epochs)
        fine_tuned = len(more.get("loss", []))
        history = {key: history.get(key, []) + more.get(key, []) for key in more}
    if backup_dir is not None:
        shutil.rmtree(backup_dir, ignore_errors=True)  # trained: nothing left to resume
    # once, not at every better epoch as ModelCheckpoint would: EarlyStopping already
    # restored the best epoch's weights, and each save cost the digits ~0.1 s an epoch
    model.save(checkpoint)
    fit_seconds = time.perf_counter() - started
    return TrainResult(model=model, history=history,
                       epochs_run=len(history.get("loss", [])), checkpoint=checkpoint,
                       tensorboard_dir=tensorboard_dir, fit_seconds=fit_seconds,
                       train_images=len(data.train.y), resumed_from_epoch=resumed_from,
                       backup_warning=backup_warning, fine_tuned_epochs=fine_tuned,
                       augmented_samples=_augmented_samples(data, augment, params.seed,
                                                            work_dir))


def _augmented_samples(data: PreparedData, augment: AugmentParams, seed: int,
                       work_dir: Path) -> Path | None:
    """A grid of a few training images and what augmentation made of them."""
    from visionops.core.augment import augmented_grid, build_augmenter
    from visionops.core.pipeline import load_pixels

    augmenter = build_augmenter(augment, seed)
    if augmenter is None:
        return None
    images = load_pixels(data.files("train")[:4], data.image_size, data.channels)
    return augmented_grid(images, augmenter, work_dir / "augmented_samples.png", seed=seed)


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    partial = path.with_name(f".partial.{path.name}")  # the same suffixes: Keras checks them
    write(partial)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


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
    with exclusive_lock(base / f"{lineage_key}.lock") as claimed:
        if claimed:
            yield base / lineage_key
            return
    private = base / f"{lineage_key}-{os.getpid()}-{secrets.token_hex(4)}"
    with exclusive_lock(private.with_name(private.name + ".lock")):
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
        with exclusive_lock(lock) as claimed:
            if claimed:
                shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                lock.unlink(missing_ok=True)
