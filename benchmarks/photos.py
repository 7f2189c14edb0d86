"""Photo-like RGB JPEGs for the benchmark and the tests: root/<class>/<index>.jpg.

    .venv/bin/python benchmarks/photos.py OUT --images N [--classes 10] [--size 256]
        [--seed 0] [--exif-rotated-fraction 0.0] [--workers W]

Each class is a shape (disc, square, triangle, ring or bars) in a hue of its own, drawn a
few times at random positions, sizes, angles and shades over a random two-colour gradient
with blotches, small distractor shapes of any kind and colour, and pixel noise. Classes
next to each other on the hue circle overlap in colour, so a model needs the shape too.
Image i belongs to class i % n_classes and depends only on (seed, i), whatever the workers.

With exif_rotated_fraction > 0, that share of the files stores its pixels turned by 90,
180 or 270 degrees with the EXIF Orientation tag (6, 3 or 8) that turns them back: decoded
with ImageOps.exif_transpose they are the same picture as the unrotated file.
"""

from __future__ import annotations

import argparse
import colorsys
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageDraw

SHAPES = ("disc", "square", "triangle", "ring", "bars")
JPEG_QUALITY = 90
NOISE = 16  # pixel noise, uniform in +-NOISE
# EXIF Orientation -> how the pixels are stored so that the tag's rotation restores them
STORED_TURN = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
               8: Image.Transpose.ROTATE_270}
PARALLEL_FROM = 2000  # fewer images are written in this process


def class_name(label: int) -> str:
    return f"class_{label:02d}"


def photo_path(root: Path, index: int, n_classes: int) -> Path:
    return Path(root) / class_name(index % n_classes) / f"{index:06d}.jpg"


def make_photos(root: Path, n_images: int, n_classes: int = 10, size: int = 256,
                seed: int = 0, exif_rotated_fraction: float = 0.0,
                workers: int | None = None) -> list[Path]:
    """Write n_images JPEGs under root/<class>/ and return their paths, by index.

    workers: processes to write with; None uses every core from PARALLEL_FROM images on.
    More than one spawns processes, so a calling script needs the
    `if __name__ == "__main__":` guard."""
    if not 0.0 <= exif_rotated_fraction <= 1.0:
        raise ValueError("exif_rotated_fraction must be within [0, 1]")
    root = Path(root)
    for label in range(min(n_classes, n_images)):
        (root / class_name(label)).mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = (os.cpu_count() or 1) if n_images >= PARALLEL_FROM else 1
    job = (root, n_classes, size, seed, exif_rotated_fraction)
    if workers <= 1:
        _write_range(job, 0, n_images)
    else:
        step = max(1, min(1000, math.ceil(n_images / (4 * workers))))
        # spawn, not fork: the caller may hold TensorFlow's threads and locks
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            ranges = [(job, start, min(start + step, n_images))
                      for start in range(0, n_images, step)]
            list(pool.map(_write_range, *zip(*ranges, strict=True)))
    return [photo_path(root, i, n_classes) for i in range(n_images)]


def draw_photo(index: int, n_classes: int = 10, size: int = 256, seed: int = 0) -> Image.Image:
    """The picture of image `index`, upright, as a PIL RGB image."""
    rng = np.random.default_rng([seed, index])
    label = index % n_classes
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 3)):  # distractors: any shape, any hue, small
        _draw_shape(draw, rng, SHAPES[rng.integers(len(SHAPES))], rng.random(), size,
                    scale=(0.06, 0.16))
    hue = label / n_classes
    for _ in range(rng.integers(1, 4)):
        _draw_shape(draw, rng, SHAPES[label % len(SHAPES)],
                    hue + rng.uniform(-0.8, 0.8) / n_classes, size, scale=(0.15, 0.45))
    noise = Image.fromarray(rng.integers(0, 2 * NOISE + 1, (size, size, 3), dtype=np.uint8))
    return ImageChops.add(image, noise, offset=-NOISE)  # clipped to 0..255


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A muted two-colour gradient in a random direction, with soft blotches; drawn at
    1/8 of the size and scaled up, as it has no detail."""
    start, end = (np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.4),
                                               rng.uniform(0.3, 0.95)), np.float32) * 255
                  for _ in range(2))
    small = max(8, size // 8)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0.0, 1.0, small, dtype=np.float32)
    along = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    along = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    blotches = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                          .resize((small, small), Image.Resampling.BICUBIC), np.float32)
    pixels = start + (end - start) * along[..., None] + 0.25 * (blotches - 128)
    return (Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            .resize((size, size), Image.Resampling.BILINEAR))


def _draw_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, shape: str, hue: float,
                size: int, scale: tuple[float, float]) -> None:
    colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(
        hue % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)))
    radius = rng.uniform(*scale) * size / 2
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    angle = rng.uniform(0, 2 * np.pi)

    def turned(points):
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]

    r = radius
    if shape == "disc":
        aspect = rng.uniform(0.7, 1.0)
        draw.ellipse((cx - r, cy - r * aspect, cx + r, cy + r * aspect), fill=colour)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour,
                     width=max(1, int(r * rng.uniform(0.2, 0.35))))
    elif shape == "square":
        draw.polygon(turned([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=colour)
    elif shape == "triangle":
        draw.polygon(turned([(r * math.cos(a), r * math.sin(a))
                             for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]),
                     fill=colour)
    else:  # bars: three parallel stripes
        width = r / 3
        for offset in (-2 * width, 0.0, 2 * width):
            draw.polygon(turned([(-r, offset - width / 2), (r, offset - width / 2),
                                 (r, offset + width / 2), (-r, offset + width / 2)]),
                         fill=colour)


def _write_range(job: tuple, start: int, stop: int) -> None:
    root, n_classes, size, seed, exif_rotated_fraction = job
    for index in range(start, stop):
        image = draw_photo(index, n_classes, size, seed)
        path = photo_path(root, index, n_classes)
        turn = np.random.default_rng([seed, index, 1])
        if turn.random() < exif_rotated_fraction:
            orientation = int(turn.choice(list(STORED_TURN)))
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = orientation
            image.transpose(STORED_TURN[orientation]).save(
                path, "JPEG", quality=JPEG_QUALITY, exif=exif)
        else:
            image.save(path, "JPEG", quality=JPEG_QUALITY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exif-rotated-fraction", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    paths = make_photos(args.out, args.images, args.classes, args.size, args.seed,
                        args.exif_rotated_fraction, args.workers)
    seconds = time.perf_counter() - start
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{len(paths)} images ({args.size}x{args.size}, {args.classes} classes, "
          f"{megabytes:.0f} MB) in {seconds:.1f} s: {len(paths) / seconds:.0f} images/s "
          f"on {os.cpu_count()} cores", file=sys.stderr)


if __name__ == "__main__":
    main()
