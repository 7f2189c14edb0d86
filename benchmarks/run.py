"""The pipeline against the seed tutorial's bare script, side by side in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--n N] [--epochs E] [--reps R]

Prints a table and writes benchmarks/results.json with these figures:
train_throughput_ratio (project with `precision: auto`, reading the images as files /
seed script on arrays, training images/s), precision_accuracy_delta_points (test accuracy
with `auto` minus with float32, same run), overhead_s (the whole
retrain flow's wall time minus its training), validate_images_per_s (the largest size),
noop_retrain_s (a retrain with nothing changed) and predict_ratio (`visionops predict`'s
images/s / a bare decode + model.predict). Ratios and medians of alternating repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from validate_scale import make_pngs, measure_validation  # noqa: E402

from visionops.core.demo import write_digits  # noqa: E402
from visionops.ops import processes  # noqa: E402
from visionops.ops.objectstore import free_port  # noqa: E402


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {platform.system()}, Python " \
           f"{platform.python_version()}, no GPU used"


def digits_arrays(n: int, bases: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 grayscale digits: the 1,797 demo digits (those `bases` selects), repeated
    with light noise."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = np.stack([np.asarray(Image.fromarray(np.uint8(img * 16)).resize(
        (28, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        for img in digits.images[bases]])[..., None]
    rng = np.random.default_rng(0)
    index = np.arange(n) % len(base)
    x = np.clip(base[index] + rng.normal(0, 0.05, (n, 28, 28, 1)), 0, 1).astype(np.float32)
    return x, digits.target[bases][index].astype(np.int64)


def seed_script_throughput(x, y, epochs: int) -> float:
    """The seed tutorial's script: its CNN, compile and fit(batch 128, validation 0.2)."""
    from visionops.core.models import seed_cnn

    model = seed_cnn((28, 28, 1), 10)
    model.compile(loss="sparse_categorical_crossentropy", optimizer="adam",
                  metrics=["accuracy"])
    start = time.perf_counter()
    # its CNN now rescales inside, so it is given pixels as the project's pipeline gives them
    model.fit(x * 255.0, y, batch_size=128, epochs=epochs, validation_split=0.2, verbose=0)
    return int(len(x) * 0.8) * epochs / (time.perf_counter() - start)


def digits_files(x, y, root: Path) -> list[str]:
    """The arrays as 28x28 PNGs, root/<label>/<i>.png: what the project reads."""
    from PIL import Image

    paths = []
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        path = f"{label}/{i:06d}.png"
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(np.round(image[..., 0] * 255))).save(root / path)
        paths.append(path)
    return paths


def project_training(paths: list[str], y, epochs: int, work: Path, precision: str,
                     test: tuple[list[str], np.ndarray], rep: int) -> tuple[float, float]:
    """The project's training on the same images as files, split the same way, streamed
    through its pipeline with the on-disk cache: (training images/s, test accuracy)."""
    from visionops.core.config import AugmentParams, TrainParams
    from visionops.core.metrics import evaluate_model
    from visionops.core.split import PreparedData, SplitFiles
    from visionops.core.training import train_model

    cut = int(len(paths) * 0.8)
    data = PreparedData(work / "data", [str(i) for i in range(10)],
                        SplitFiles(paths[:cut], y[:cut]), SplitFiles(paths[cut:], y[cut:]),
                        SplitFiles(*test), image_size=28, channels=1)
    result = train_model(data, TrainParams(epochs=epochs, batch_size=128,
                                           early_stopping_patience=epochs,
                                           precision=precision),
                         AugmentParams(), work / f"train-{precision}-{rep}", verbose=0,
                         cache=work / "cache" / f"{precision}-{rep}")
    accuracy = evaluate_model(result.model, data.data_dir, test[0], test[1],
                              data.class_names).metrics["accuracy"]
    return result.train_images * result.epochs_run / result.fit_seconds, accuracy


def run_cli(args: list[str], cwd: Path, env: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("visionops")), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(done.stdout.strip().splitlines()[-1])


def make_project(root: Path, epochs: int) -> Path:
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(epochs=epochs, early_stopping_patience=epochs)
    # the benchmark measures time, not quality: every model passes the floors
    params["gate"].update(min_accuracy=0.0, min_f1_macro=0.0, min_class_recall=0.0)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_digits(root / "data")
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "--no-scm", "-q"],
                   cwd=root, check=True)
    return root


def isolated_env(scratch: Path) -> dict:
    """This environment without Prefect, MLflow and visionops settings, and a Prefect home
    of its own: no server, store or param override of the machine's leaks in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "VISIONOPS_"))}
    env["PREFECT_HOME"] = str(scratch / "prefect")
    return env


def params_for_model(project: Path, name: str) -> Path:
    """The project's params.yaml under another registered model name: its retrain takes the
    whole path of a first champion."""
    params = project / f"params-{name}.yaml"
    params.write_text((project / "params.yaml").read_text().replace(
        "model_name: visionops-digits", f"model_name: {name}"))
    return params


@contextlib.contextmanager
def prefect_server(env: dict, log: Path):
    """A `prefect server start` on a free port, stopped by PID; yields its API URL."""
    port = free_port()
    server = processes.start(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
         "127.0.0.1", "--port", str(port)], log, env=env)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: urllib.request.urlopen(api + "/health", timeout=5), 120)
        yield api
    finally:
        processes.stop(server)


def measure_retrains(project: Path, env: dict, reps: int, label: str) -> dict:
    """Median wall time, training time and their difference over `reps` retrains. Each
    registers a model name of its own in the same store, so each takes the whole path:
    train, evaluate, register, the serve check in a fresh process, the exports and the
    promotion of a first champion."""
    walls, fits = [], []
    for rep in range(reps):
        params = params_for_model(project, f"bench-params-{label.replace(' ', '-')}-{rep}")
        wall, summary = run_cli(["retrain", "--json", "--params", str(params)], project, env)
        assert summary["decision"] == "first_champion", summary["decision"]
        walls.append(wall)
        fits.append(summary["fit_seconds"])
    figures = {"wall_s": statistics.median(walls), "fit_s": statistics.median(fits),
               "overhead_s": statistics.median(w - f for w, f in zip(walls, fits, strict=True))}
    print(f"retrain flow, {label}: median {figures['wall_s']:.1f} s wall, "
          f"{figures['fit_s']:.1f} s training -> overhead {figures['overhead_s']:.1f} s "
          f"(of {reps})", flush=True)
    return figures


def wait_for(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def predict_throughputs(project: Path, reps: int) -> tuple[float, float]:
    from PIL import Image

    from visionops.core.config import load_params
    from visionops.core.predict import image_paths, predict_paths
    from visionops.io.models import load_champion

    champion = load_champion(load_params(project / "params.yaml"))
    paths = image_paths([project / "data"])

    def project_rate() -> float:
        start = time.perf_counter()
        rows = list(predict_paths(champion, paths))
        return len(rows) / (time.perf_counter() - start)

    def raw_rate() -> float:  # decode, resize, scale, model.predict: nothing else
        start = time.perf_counter()
        x = np.stack([np.asarray(Image.open(p).convert("L").resize(
            (28, 28), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            for p in paths])[..., None]
        champion.model.predict(x, verbose=0)
        return len(paths) / (time.perf_counter() - start)

    project_rates, raw_rates = [], []
    for _ in range(reps):
        raw_rates.append(raw_rate())
        project_rates.append(project_rate())
    return statistics.median(project_rates), statistics.median(raw_rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes on 2 cores")
    parser.add_argument("--n", type=int, default=None, help="training images")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    n = args.n or (4_000 if args.quick else 10_000)
    epochs = args.epochs or (3 if args.quick else 10)
    sizes = [5_000, 20_000] if args.quick else [10_000, 100_000]
    results = {"machine": machine(), "quick": args.quick, "n": n, "epochs": epochs}
    scratch = Path(tempfile.mkdtemp(prefix="visionops-bench-"))

    x, y = digits_arrays(n, slice(0, 1_500))
    # 2,000 noisy copies of the 297 digits never trained on
    held_out_x, held_out_y = digits_arrays(2_000, slice(1_500, None))
    files = digits_files(np.concatenate([x, held_out_x]), np.concatenate([y, held_out_y]),
                         scratch / "digits" / "data")
    test = (files[n:], held_out_y)  # for accuracy only
    files = files[:n]
    seed_rates, rates, accuracies = [], {"float32": [], "auto": []}, {"float32": [],
                                                                     "auto": []}
    for rep in range(args.reps):  # alternate, so drift in the machine hits all alike
        seed_rates.append(seed_script_throughput(x, y, epochs))
        for precision in rates:
            rate, accuracy = project_training(files, y, epochs, scratch / "digits",
                                              precision, test, rep)
            rates[precision].append(rate)
            accuracies[precision].append(accuracy)
    results["train_images_per_s"] = {"seed_script": statistics.median(seed_rates),
                                      **{f"project_{p}": statistics.median(r)
                                         for p, r in rates.items()}}
    results["test_accuracy"] = {p: statistics.median(a) for p, a in accuracies.items()}
    results["train_throughput_ratio"] = (results["train_images_per_s"]["project_auto"]
                                         / results["train_images_per_s"]["seed_script"])
    results["train_throughput_ratio_float32"] = (
        results["train_images_per_s"]["project_float32"]
        / results["train_images_per_s"]["seed_script"])
    results["precision_accuracy_delta_points"] = 100 * (results["test_accuracy"]["auto"]
                                                        - results["test_accuracy"]["float32"])
    print(f"training images/s: seed script {statistics.median(seed_rates):,.0f}, project "
          f"float32 {results['train_images_per_s']['project_float32']:,.0f}, auto precision "
          f"{results['train_images_per_s']['project_auto']:,.0f} -> ratio "
          f"{results['train_throughput_ratio']:.2f} (float32 "
          f"{results['train_throughput_ratio_float32']:.2f}); test accuracy float32 "
          f"{results['test_accuracy']['float32']:.4f}, auto "
          f"{results['test_accuracy']['auto']:.4f}", flush=True)

    env = isolated_env(scratch)
    project = make_project(scratch / "project", epochs)
    run_cli(["retrain", "--json"], project, env)  # the first champion; Prefect's database
    overheads = measure_retrains(project, env, args.reps, "ephemeral")
    results.update(retrain_wall_s=overheads["wall_s"], fit_s=overheads["fit_s"],
                   overhead_s=overheads["overhead_s"])
    # The nightly deployment and a team's stack run against a Prefect server: no
    # temporary server to start per run.
    with prefect_server(env, scratch / "prefect-server.log") as api:
        served = measure_retrains(project, {**env, "PREFECT_API_URL": api}, args.reps,
                                  "with a Prefect server")
        results["overhead_with_prefect_server_s"] = served["overhead_s"]
    noop = [run_cli(["retrain", "--json"], project, env)[0] for _ in range(args.reps)]
    results["noop_retrain_s"] = statistics.median(noop)
    print(f"unchanged retrain: {results['noop_retrain_s']:.1f} s (median of {len(noop)})",
          flush=True)

    project_rate, raw_rate = predict_throughputs(project, args.reps)
    results["predict_images_per_s"] = {"visionops": project_rate, "raw": raw_rate}
    results["predict_ratio"] = project_rate / raw_rate
    print(f"predict images/s: visionops {project_rate:,.0f}, raw model.predict "
          f"{raw_rate:,.0f} -> ratio {results['predict_ratio']:.2f}", flush=True)

    results["validation"] = []
    for count in sizes:
        root = scratch / f"pngs-{count}"
        make_pngs(root, count)
        run = measure_validation(root)
        results["validation"].append(run)
        print(f"validate {count:,} PNGs: {run['images'] / run['total_s']:,.0f} images/s, "
              f"peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    largest = results["validation"][-1]
    results["validate_images_per_s"] = largest["images"] / largest["total_s"]
    results["validate_rss_ratio"] = (largest["peak_rss_mb"]
                                     / results["validation"][0]["peak_rss_mb"])

    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['machine']}")
    for key, target in (("train_throughput_ratio", ">= 1.4"),
                        ("precision_accuracy_delta_points", ">= -0.5"), ("overhead_s", "<= 15"),
                        ("overhead_with_prefect_server_s", "<= 15"),
                        ("validate_images_per_s", ">= 3000"), ("noop_retrain_s", "<= 20"),
                        ("predict_ratio", ">= 0.9")):
        print(f"  {key:<24} {results[key]:>10.2f}   target {target}")


if __name__ == "__main__":
    main()
