"""Validation and dataset-versioning at scale: images/s and peak memory for N small
synthetic PNGs, and `dvc add` time for the largest N with DVC's default cache link type
and with hardlinks (DVC's advice for many small files).

    .venv/bin/python benchmarks/validate_scale.py [--sizes 10000 100000] [--out DIR]

Each measurement runs in a fresh Python process, so peak RSS is that run's own.
Figures are printed as a table and written to benchmarks/validate_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
LABELS = 10

MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
from visionops.io.validation import collect_facts, validate_facts
from visionops.core.config import ValidationParams

root = Path(sys.argv[1])
rules = ValidationParams(min_images_per_class=1)
start = time.perf_counter()
facts = collect_facts(root, rules.max_side)
facts_s = time.perf_counter() - start
report = validate_facts(root, facts, rules)
total_s = time.perf_counter() - start
print(json.dumps({
    "images": len(facts), "success": report.success,
    "facts_s": facts_s, "total_s": total_s,
    # VmHWM is this process's own peak; ru_maxrss can carry the forking parent's
    "peak_rss_mb": int(next(line.split()[1] for line in open("/proc/self/status")
                            if line.startswith("VmHWM"))) / 1024,
    "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def _write_chunk(args: tuple[Path, int, int]) -> None:
    root, start, stop = args
    rng = np.random.default_rng(start)
    for index in range(start, stop):
        folder = root / f"class_{index % LABELS}"
        pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index:07d}.png")


def make_pngs(root: Path, count: int) -> None:
    for label in range(LABELS):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
    step = 5000
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_chunk, [(root, i, min(i + step, count))
                                     for i in range(0, count, step)]))


def measure_validation(root: Path) -> dict:
    output = subprocess.run([sys.executable, "-c", MEASURE, str(root)], check=True,
                            capture_output=True, text=True, cwd=HERE.parent).stdout
    return json.loads(output.strip().splitlines()[-1])


def time_dvc_add(root: Path, count: int, cache_type: str | None) -> dict:
    repo = root.parent / f"dvc-{cache_type or 'default'}"
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir()
    shutil.copytree(root, repo / "data")
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    if cache_type:
        subprocess.run([dvc, "config", "cache.type", cache_type], cwd=repo, check=True)
    timings = {}
    for step in ("first add", "unchanged add", "add after one new file"):
        if step == "add after one new file":
            (repo / "data" / "class_0" / "extra.png").write_bytes(b"new content")
        start = time.perf_counter()
        subprocess.run([dvc, "add", "-q", "data"], cwd=repo, check=True)
        timings[step] = round(time.perf_counter() - start, 1)
    shutil.rmtree(repo, ignore_errors=True)
    return {"files": count, "cache_type": cache_type or "default (reflink,copy)", **timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=None, help="scratch folder")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="visionops-bench-", dir=args.out))
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"Python {platform.python_version()}", "validation": [], "dvc_add": []}
    try:
        for count in args.sizes:
            root = scratch / f"pngs-{count}"
            make_pngs(root, count)
            run = measure_validation(root)
            run["facts_images_per_s"] = round(run["images"] / run["facts_s"])
            run["validate_images_per_s"] = round(run["images"] / run["total_s"])
            results["validation"].append(run)
            print(f"validate {count:>7} PNGs: read+hash+header+decode "
                  f"{run['facts_images_per_s']:>6} images/s, with the GX suite "
                  f"{run['validate_images_per_s']:>6} images/s, peak RSS "
                  f"{run['peak_rss_mb']:.0f} MB (largest worker "
                  f"{run['worker_peak_rss_mb']:.0f} MB)", flush=True)
        small, large = results["validation"][0], results["validation"][-1]
        results["peak_rss_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 2)
        print(f"peak RSS {large['images']} vs {small['images']} images: "
              f"{results['peak_rss_ratio']}x")
        largest = scratch / f"pngs-{args.sizes[-1]}"
        for cache_type in (None, "hardlink"):
            timing = time_dvc_add(largest, args.sizes[-1], cache_type)
            results["dvc_add"].append(timing)
            print(f"dvc add {timing['files']} files, cache.type {timing['cache_type']}: "
                  + ", ".join(f"{k} {v} s" for k, v in timing.items()
                              if k not in ("files", "cache_type")), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["machine"] += f"; {results['validation'][-1]['images']} images largest"
    (HERE / "validate_scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
