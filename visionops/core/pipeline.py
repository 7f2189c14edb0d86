"""The one input pipeline: image files in, batches of uint8 pixels out, read by
training, evaluation, scoring and prediction alike.

Files are decoded and resized in parallel (`num_parallel_calls=AUTOTUNE`), so memory
holds a few batches, never a split. Pixels stay uint8 [0, 255] until the model, which
does its own rescaling (and a backbone's own preprocessing) inside it: the registered
model takes raw pixels. Versions registered before that took [0, 1] floats; the version
tag `input_contract` says which a model takes, and `scale_for` serves both.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from visionops.core.flock import exclusive_lock

if TYPE_CHECKING:
    import tensorflow as tf

INPUT_CONTRACT_TAG = "input_contract"
PIXELS = "pixels_0_255"   # uint8 or float pixels in [0, 255]; the model rescales
UNIT_FLOAT = "unit_float"  # float32 in [0, 1]: versions registered before PIXELS
DECODED_TOGETHER = 16  # files decoded in one call of the pipeline's Python function
# Bumped whenever decoding changes, so that no cache made by another decoding is read.
DECODING = "pil-draft-exif-bilinear-1"


class UnreadableImage(ValueError):
    """A file that does not decode as an image; the message names it."""


def decode_image(path: str | Path, image_size: int, channels: int) -> np.ndarray:
    """One file as uint8 pixels (size, size, channels): EXIF orientation applied (phone
    photos are stored rotated), converted to L or RGB, resized bilinearly. A large JPEG
    is decoded at a reduced scale first (PIL's draft mode), still at least `image_size`."""
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as image:
            image.draft(mode, (image_size, image_size))
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I"):  # 16-bit: scaled to 8 bits, where convert clips
                wide = np.asarray(image, dtype=np.float64) / 257.0
                image = Image.fromarray(np.clip(np.round(wide), 0, 255).astype(np.uint8))
            image = image.convert(mode)
            image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # a bad file
        raise UnreadableImage(f"{path}: not a readable image ({type(exc).__name__}: {exc})"
                              ) from exc


def load_pixels(paths: Sequence[str | Path], image_size: int, channels: int) -> np.ndarray:
    """A few files as one uint8 array (N, size, size, channels): samples, not splits."""
    if not paths:
        return np.zeros((0, image_size, image_size, channels), dtype=np.uint8)
    return np.stack([decode_image(p, image_size, channels) for p in paths])


def scale_for(pixels, contract: str):
    """Pixels as a model with this input contract takes them (a NumPy array or a tensor)."""
    if contract == UNIT_FLOAT:
        return pixels / 255.0 if isinstance(pixels, np.ndarray) else _unit(pixels)
    if contract != PIXELS:
        raise ValueError(f"unknown input contract {contract!r}")
    return pixels.astype(np.float32) if isinstance(pixels, np.ndarray) else _float(pixels)


def _unit(pixels):
    import tensorflow as tf

    return tf.cast(pixels, tf.float32) / 255.0


def _float(pixels):
    import tensorflow as tf

    return tf.cast(pixels, tf.float32)


def model_input(model) -> tuple[int, int]:
    """(image size, channels) a Keras model takes."""
    _, size, _, channels = model.input_shape
    return size, channels


def image_dataset(paths: Sequence[str | Path], image_size: int, channels: int,
                  batch_size: int, labels: np.ndarray | None = None, *,
                  shuffle_seed: int | None = None, shuffle_buffer: int = 1_000,
                  cache_dir: Path | None = None, contract: str | None = None
                  ) -> tf.data.Dataset:
    """Batches of (pixels, labels), or of pixels without `labels`, in file order unless
    `shuffle_seed` is given. Shuffling reorders the file names before decoding, a full
    shuffle at a few bytes an image, anew each epoch. With `cache_dir`, the files are put
    in one seeded random order, decoded into a cache file there on the first pass and
    read back on later ones, shuffled again `shuffle_buffer` images at a time. The cache
    file is named after the files, their labels, their order and the preprocessing, so
    a cache is never read for other files or another split. `contract` scales the pixels
    for a model (default: uint8 as decoded)."""
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    paths = [str(p) for p in paths]
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    if cache_dir is not None and shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(paths))
        paths = [paths[i] for i in order]
        labels = None if labels is None else labels[order]
    names = tf.data.Dataset.from_tensor_slices(paths)
    dataset = names if labels is None else tf.data.Dataset.zip(
        names, tf.data.Dataset.from_tensor_slices(labels))
    if shuffle_seed is not None and cache_dir is None:
        dataset = dataset.shuffle(max(len(paths), 1), seed=shuffle_seed,
                                  reshuffle_each_iteration=True)

    def decode(names):
        pixels = tf.numpy_function(
            lambda found: load_pixels([name.decode() for name in found], image_size, channels),
            [names], tf.uint8, stateful=False)
        return tf.ensure_shape(pixels, (None, image_size, image_size, channels))

    # A few files per call: one Python call per image costs small images most of their
    # decoding time (28x28 PNGs: 3,900 images/s one by one, more than twice that so).
    dataset = dataset.batch(DECODED_TOGETHER)
    if labels is None:
        dataset = dataset.map(decode, num_parallel_calls=autotune)
    else:
        dataset = dataset.map(lambda names, label: (decode(names), label),
                              num_parallel_calls=autotune)
    # unbatch hides the count from Keras, which then warns at the end of every epoch
    dataset = dataset.unbatch().apply(tf.data.experimental.assert_cardinality(len(paths)))
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        dataset = dataset.cache(str(cache_dir / _cache_name(paths, labels, image_size,
                                                             channels)))
        if shuffle_seed is not None:
            dataset = dataset.shuffle(shuffle_buffer, seed=shuffle_seed,
                                      reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if contract is not None:
        dataset = dataset.map((lambda x: scale_for(x, contract)) if labels is None else
                              (lambda x, y: (scale_for(x, contract), y)),
                              num_parallel_calls=autotune)
    return dataset.prefetch(autotune)


def predict_files(model, paths: Sequence[str | Path], contract: str,
                  batch_size: int = 256) -> Iterator[np.ndarray]:
    """The model's outputs for the files, one array per batch, in file order, decoding
    the next batches while this one is predicted."""
    import tensorflow as tf

    size, channels = model_input(model)
    batches = iter(image_dataset(paths, size, channels, batch_size, contract=contract))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except tf.errors.OpError as exc:  # a decoding error, raised inside tf.data
            found = re.search(r"UnreadableImage: (.*)", exc.message)
            raise UnreadableImage(found.group(1) if found else exc.message) from None
        yield np.asarray(model.predict_on_batch(batch))


def predict_pixels(model, pixels: np.ndarray, contract: str) -> np.ndarray:
    """The model's outputs for uint8 pixels (N, size, size, channels) in one call, scaled
    as its input contract says: decoded images in memory, where `predict_files` streams
    files."""
    return np.asarray(model.predict_on_batch(scale_for(pixels, contract)))


def _cache_name(paths: list[str], labels: np.ndarray | None, image_size: int,
                channels: int) -> str:
    digest = hashlib.sha256(f"{image_size}:{channels}:{DECODING}\n".encode())
    digest.update("\n".join(paths).encode())
    if labels is not None:
        digest.update(labels.tobytes())
    return f"images-{digest.hexdigest()[:24]}"


def cache_folder(root: Path, data_version: str, image_size: int, channels: int) -> Path:
    """Where decoded images of one data version at one preprocessing are cached."""
    key = hashlib.sha256(f"{data_version}:{image_size}:{channels}:{DECODING}".encode())
    return root / key.hexdigest()[:16]


CACHE_KEY = re.compile(r"[0-9a-f]{16}")  # the names cache_folder gives, and nothing else


@contextlib.contextmanager
def claim_cache(folder: Path) -> Iterator[Path | None]:
    """The cache folder, held for the block, or None while another run holds it (that
    run then trains uncached). A cache a killed run left half-written (files without
    TensorFlow's `.index`) is removed first: TensorFlow refuses its stale lockfiles.
    Caches of other data versions beside it (named as `cache_folder` names them) that no
    run holds are removed: a nightly retrain keeps one cache, not one a night."""
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(folder / ".claim") as claimed:
        if not claimed:
            yield None
            return
        complete = {p.name.removesuffix(".index") for p in folder.glob("*.index")}
        for file in folder.iterdir():
            if file.name != ".claim" and file.name.split(".")[0].split("_")[0] not in complete:
                file.unlink(missing_ok=True)
        for other in folder.parent.iterdir():
            if other == folder or not CACHE_KEY.fullmatch(other.name) or not other.is_dir():
                continue
            with exclusive_lock(other / ".claim") as unused:
                if unused:  # or its claim file was gone: half-removed by a killed run
                    shutil.rmtree(other, ignore_errors=True)
        yield folder
