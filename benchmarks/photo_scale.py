"""Photos at scale: the input pipeline, training and evaluation on N generated RGB
JPEGs (256 px, 10 classes) trained at 128 px, each size in a fresh process, so that
its peak RSS is its own.

    .venv/bin/python benchmarks/photo_scale.py [--sizes 10000 50000] [--out DIR]

Per size: decode+resize images/s through the pipeline alone, then the part of a
retrain that used to hold every split as float arrays (split, train one epoch with the
on-disk cache on, as by default, evaluate on the test split), and the process's peak
RSS. On the smallest size also the input-bound ratio: training images/s reading the
images through the pipeline / the same fit on the same images preloaded into memory, in
one process, alternating; for epochs after the first (read from the cache) and for an
epoch decoding the files. Written to benchmarks/photo_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from photos import make_photos  # noqa: E402

_COMMON = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from visionops.core.config import AugmentParams, DataParams, SplitParams, TrainParams
from visionops.core.images import iter_image_files
from visionops.core.split import assign_splits, prepare_data
import pandas as pd

root, size, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
files = list(iter_image_files(root))
# the split is keyed on a content hash; the path stands in for it here (no re-hashing)
facts = pd.DataFrame([{"path": p, "label": l, "sha256": p} for p, l in files])
data = prepare_data(root, assign_splits(facts, SplitParams()), DataParams(image_size=size,
                                                                          channels=3))
train = TrainParams(epochs=1, batch_size=batch, early_stopping_patience=1)

def peak_rss_mb():
    return int(next(line.split()[1] for line in open("/proc/self/status")
                    if line.startswith("VmHWM"))) / 1024
"""

SCALE = _COMMON + r"""
from visionops.core.metrics import evaluate_model
from visionops.core.pipeline import image_dataset
from visionops.core.training import train_model

start = time.perf_counter()
decoded = sum(len(b) for b in image_dataset([root / p for p, _ in files], size, 3, 256))
decode_s = time.perf_counter() - start
# as a retrain runs by default: data.cache on, so the shuffle buffer is in the peak too
result = train_model(data, train, AugmentParams(), Path(sys.argv[4]), verbose=0,
                     cache=Path(sys.argv[4]) / "cache")
start = time.perf_counter()
evaluation = evaluate_model(result.model, root, data.test.paths, data.test.y,
                            data.class_names)
print(json.dumps({
    "images": len(files), "decode_images_per_s": decoded / decode_s,
    "fit_images_per_s": result.train_images / result.fit_seconds,
    "fit_s": result.fit_seconds, "evaluate_s": time.perf_counter() - start,
    "test_accuracy": evaluation.metrics["accuracy"], "peak_rss_mb": peak_rss_mb()}))
"""

INPUT_BOUND = _COMMON + r"""
import keras
import tensorflow as tf
from visionops.core.models import build_model
from visionops.core.pipeline import load_pixels
from visionops.core.training import training_datasets

def fit_rate(dataset):
    keras.utils.set_random_seed(0)
    model = build_model(train, data.input_shape, len(data.class_names))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(dataset.take(2), verbose=0)  # graph building, not measured
    start = time.perf_counter()
    model.fit(dataset, epochs=1, verbose=0)
    return len(data.train.y) / (time.perf_counter() - start)

from_files, _ = training_datasets(data, batch, AugmentParams(), seed=0)
cache = Path(sys.argv[4])
cached, _ = training_datasets(data, batch, AugmentParams(), seed=0, cache=cache)
for _ in cached:  # the first epoch decodes the files into the cache; later epochs read it
    pass
pixels = load_pixels(data.files("train"), size, 3)
preloaded = (tf.data.Dataset.from_tensor_slices((pixels, data.train.y))
             .shuffle(len(pixels), seed=0).batch(batch).prefetch(tf.data.AUTOTUNE))
rates = {"files_cached": [], "files_uncached": [], "preloaded": []}
for _ in range(2):  # alternating, so drift in the machine hits all alike
    for name, dataset in (("preloaded", preloaded), ("files_cached", cached),
                          ("files_uncached", from_files)):
        rates[name].append(fit_rate(dataset))
best = {name: max(values) for name, values in rates.items()}
print(json.dumps({**{f"fit_images_per_s_{name}": value for name, value in best.items()},
                  "input_bound_ratio": best["files_cached"] / best["preloaded"],
                  "input_bound_ratio_uncached": best["files_uncached"] / best["preloaded"]}))
"""


def run(script: str, *args) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(sizes: list[int], out: Path, image_size: int = 128, batch: int = 64) -> dict:
    results = {"image_size": image_size, "runs": []}
    for count in sizes:
        root = out / f"photos-{count}"
        if not root.is_dir():
            make_photos(root, count, n_classes=10, size=256, seed=count,
                        exif_rotated_fraction=0.1)
        figures = run(SCALE, root, image_size, batch, out / f"train-{count}")
        results["runs"].append(figures)
        print(f"{count:,} photos: decode+resize {figures['decode_images_per_s']:,.0f} images/s, "
              f"fit {figures['fit_images_per_s']:,.0f} images/s, evaluate "
              f"{figures['evaluate_s']:.0f} s, peak RSS {figures['peak_rss_mb']:,.0f} MB",
              flush=True)
        if count == sizes[0]:
            results["input_bound"] = run(INPUT_BOUND, root, image_size, batch,
                                         out / f"cache-{count}")
            print(f"input-bound ratio {results['input_bound']['input_bound_ratio']:.2f} "
                  f"({results['input_bound']}", flush=True)
    first, last = results["runs"][0], results["runs"][-1]
    results["rss_ratio"] = last["peak_rss_mb"] / first["peak_rss_mb"]
    print(f"peak RSS {last['images']:,} / {first['images']:,}: {results['rss_ratio']:.2f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="visionops-photos-"))
    results = measure(args.sizes, out)
    (HERE / "photo_scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
