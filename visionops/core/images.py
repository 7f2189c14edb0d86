"""Reading images: the per-image facts validation checks, and the one
preprocessing (decode, convert, resize, scale to [0, 1]) that training,
evaluation and prediction all share."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageStat

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
FACT_COLUMNS = [
    "path", "label", "inside_root", "format", "width", "height", "mode", "bytes", "sha256",
    "decodable", "constant", "brightness", "error",
]


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def iter_image_files(root: Path) -> Iterator[tuple[str, str]]:
    """Yield (path relative to root, label) for every image in root/<label>/, sorted.
    Symlinks are listed as they are; `image_facts` says whether they stay inside root."""
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                yield file.relative_to(root).as_posix(), class_dir.name


def image_file_chunks(root: Path, size: int) -> list[list[tuple[str, str]]]:
    """`iter_image_files` in chunks of `size` (one empty chunk for an empty folder)."""
    files = list(iter_image_files(root))
    return [files[i:i + size] for i in range(0, len(files), size)] or [[]]


def class_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_facts(root: Path, relative_path: str, label: str, max_side: int | None = None) -> dict:
    """What validation needs to know about one file; never raises on a bad image.

    A file whose real path leads outside `root` is not read at all. An image whose
    header says a side exceeds `max_side` is not decoded (`decodable` stays None), so a
    decompression bomb is refused from its header.
    """
    path = root / relative_path
    facts = dict.fromkeys(FACT_COLUMNS)
    facts.update(path=relative_path, label=label, inside_root=_inside(path, root))
    if not facts["inside_root"]:
        facts["error"] = f"leads outside the dataset folder (to {path.resolve()})"
        return facts
    raw = path.read_bytes()
    facts.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(), decodable=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                facts.update(format=image.format, width=image.width, height=image.height,
                             mode=image.mode)
                if max_side is not None and max(image.size) > max_side:
                    facts["decodable"] = None
                    return facts
                image.load()
                extrema = image.getextrema()
                gray = image if image.mode in ("L", "1") else image.convert("L")
                brightness = ImageStat.Stat(gray).mean[0] / 255.0
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        facts.update(decodable=True, constant=all(low == high for low, high in bands),
                     brightness=brightness)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a fact to report
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


def facts_table(root: Path, files: list[tuple[str, str]], max_side: int | None = None
                ) -> pd.DataFrame:
    """`image_facts` for each (relative path, label), as one table."""
    rows = [image_facts(root, path, label, max_side) for path, label in files]
    return pd.DataFrame(rows, columns=FACT_COLUMNS)


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode one image into a float32 array of shape (size, size, channels) in [0, 1]."""
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return array.reshape(image_size, image_size, channels)


def load_images(paths: Iterable[Path], image_size: int, channels: int) -> np.ndarray:
    arrays = [load_image(Path(p), image_size, channels) for p in paths]
    if not arrays:
        return np.zeros((0, image_size, image_size, channels), dtype=np.float32)
    return np.stack(arrays)
