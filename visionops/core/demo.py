"""The demo dataset: scikit-learn's bundled handwritten digits as PNG files in
the same class-per-folder layout a user's own images have."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_digits(out_dir: Path, per_class: int | None = None,
                 labels: Iterable[int] | None = None) -> int:
    """Write data/<digit>/digit_<index>.png (8x8 grayscale); return the number written.

    `per_class` keeps only the first N images of each digit and `labels` only those
    digits (for tiny test sets).
    Writing is idempotent: files already there with the same name are left alone.
    """
    digits = load_digits()
    labels = None if labels is None else set(labels)
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # values are 0..16
    written = 0
    counts: dict[int, int] = {}
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        label = int(label)
        if labels is not None and label not in labels:
            continue
        if per_class is not None and counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        target = out_dir / str(label) / f"digit_{index:04d}.png"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="L").save(target, format="PNG")
        written += 1
    return written
