"""Memory does not grow with the dataset: training and evaluation stream images from
files (a tiny version of benchmarks/photo_scale.py's RSS check)."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

RUN = r"""
import json, sys
from pathlib import Path
import pandas as pd
from visionops.core.config import AugmentParams, DataParams, SplitParams, TrainParams
from visionops.core.images import iter_image_files
from visionops.core.metrics import evaluate_model
from visionops.core.split import assign_splits, prepare_data
from visionops.core.training import train_model

root = Path(sys.argv[1])
facts = pd.DataFrame([{"path": p, "label": l, "sha256": p} for p, l in iter_image_files(root)])
data = prepare_data(root, assign_splits(facts, SplitParams()), DataParams(image_size=32,
                                                                          channels=3))
result = train_model(data, TrainParams(epochs=1, batch_size=64), AugmentParams(),
                     Path(sys.argv[2]), verbose=0)
evaluate_model(result.model, root, data.test.paths, data.test.y, data.class_names)
print(json.dumps({"peak_rss_mb": int(next(line.split()[1] for line in open("/proc/self/status")
                                          if line.startswith("VmHWM"))) / 1024}))
"""


def peak_rss_mb(root, work) -> float:
    done = subprocess.run([sys.executable, "-c", RUN, str(root), str(work)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def noise_images(root, count):
    rng = np.random.default_rng(count)
    for i in range(count):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    return root


def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    # Below about 1,000 images TensorFlow's buffers and threads are still growing
    # (measured peaks: 400 images 856 MB, 1,500: 893, 4,000: 902, 8,000: 904).
    small = peak_rss_mb(noise_images(tmp_path / "small", 1000), tmp_path / "w1")
    large = peak_rss_mb(noise_images(tmp_path / "large", 5000), tmp_path / "w2")
    # Held as float32 arrays in about 3.5 copies, as before streaming, the 4,000 more
    # images would take 4,000 * 32 * 32 * 3 * 4 bytes * 3.5 = 172 MB more.
    assert large - small < 40, (small, large)
