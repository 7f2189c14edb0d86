"""Label images with a loaded model: the same input pipeline as training
(`visionops.core.pipeline`), at the model's own input size and input contract."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from visionops.core.images import IMAGE_SUFFIXES
from visionops.core.pipeline import UNIT_FLOAT, model_input, predict_files

INPUT_VALUES_PER_STEP = 2**20  # a predict step: ~4 MB of input, 32 to 1,024 images


def image_paths(targets: Iterable[Path]) -> list[Path]:
    """Files as given; folders expanded to the images below them, sorted."""
    paths = []
    for target in map(Path, targets):
        if target.is_dir():
            paths += sorted(p for p in target.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif target.is_file():
            paths.append(target)
        else:
            raise FileNotFoundError(f"{target}: no such file or folder")
    return paths


def predict_step(model) -> int:
    """Images a predict step takes: Keras's default of 32 costs small images most of their
    time in the steps themselves (5,300 images/s against 9,700 with 1,024 for the 28x28
    digits)."""
    size, channels = model_input(model)
    return min(1024, max(32, INPUT_VALUES_PER_STEP // (size * size * channels)))


def predict_paths(champion, paths: list[Path]) -> Iterator[dict]:
    """A row (path, label, probability) per file, streamed in file order. `champion`
    is a loaded version: its model, class names and input contract."""
    contract = getattr(champion, "input_contract", UNIT_FLOAT)
    batches = predict_files(champion.model, paths, contract,
                            batch_size=predict_step(champion.model))
    rows = (row for batch in batches for row in batch)
    for path, row in zip(paths, rows, strict=True):
        best = int(np.argmax(row))
        yield {"path": str(path), "label": champion.class_names[best],
               "probability": float(row[best])}
