"""The image files of a dataset and the per-image facts validation checks. Decoding
for training, evaluation and prediction is visionops.core.pipeline's."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageStat

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
FACT_COLUMNS = [
    "path", "label", "inside_root", "format", "width", "height", "mode", "bytes", "sha256",
    "decodable", "constant", "brightness", "phash", "error",
]
# Read a facts CSV with these: a hash of only decimal digits would otherwise become a number.
# Tables written before `phash` existed lack it; nothing that reads old tables needs it.
FACT_DTYPES = {"path": str, "label": str, "sha256": str, "phash": str, "excluded": str}
PHASH_SIDE = 32  # the grayscale thumbnail the perceptual hash is taken from
PHASH_FREQUENCIES = 8  # 8 x 8 lowest frequencies: 64 bits
# DCT-II basis: row k is cos(pi * k * (2n + 1) / 2N) over the thumbnail's pixels n.
_DCT_BASIS = np.cos(np.pi / (2 * PHASH_SIDE) * np.outer(np.arange(PHASH_FREQUENCIES),
                                                        2 * np.arange(PHASH_SIDE) + 1))


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


def perceptual_hash(gray: Image.Image) -> str:
    """A 64-bit perceptual hash (pHash) of a grayscale image as 16 hex digits: which of
    the 8 x 8 lowest DCT frequencies of a 32 x 32 thumbnail exceed their median. Small
    edits (brightness, re-encoding, resizing) change few bits; other images about half."""
    thumbnail = gray.resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS,
                            reducing_gap=3.0)
    pixels = np.asarray(thumbnail, dtype=np.float64)
    frequencies = _DCT_BASIS @ pixels @ _DCT_BASIS.T
    bits = np.packbits(frequencies > np.median(frequencies))
    return bits.tobytes().hex()


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
                phash = perceptual_hash(gray if gray.mode == "L" else gray.convert("L"))
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        facts.update(decodable=True, constant=all(low == high for low, high in bands),
                     brightness=brightness, phash=phash)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a fact to report
        facts["error"] = f"{type(exc).__name__}: {exc}"
    return facts


def facts_table(root: Path, files: list[tuple[str, str]], max_side: int | None = None
                ) -> pd.DataFrame:
    """`image_facts` for each (relative path, label), as one table."""
    rows = [image_facts(root, path, label, max_side) for path, label in files]
    return pd.DataFrame(rows, columns=FACT_COLUMNS)
