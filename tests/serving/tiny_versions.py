"""Tiny registered versions to serve, and a `visionops serve-model` process to serve them.

Run as a script (its own process: TensorFlow and MLflow's globals stay out of pytest's),
it registers two deliberately different 8x8 grayscale models as versions of
params' registered model, optionally a third that carries a pickle, optionally promotes
one, and writes each safe version's own answers (`visionops predict`'s code) on images:

    python tiny_versions.py PARAMS [--images DIR] [--unsafe MARKER] [--promote N|first]
                            [--versions 1|2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CLASSES = ["0", "1", "2", "3"]
SEEDS = (1, 2)  # v1, v2
HERE = Path(__file__).resolve().parent
VISIONOPS = Path(sys.executable).parent / "visionops"


class OpensFile:
    """Unpickled, it creates the file at `path`: the code a crafted version would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class Registration:
    """This file run as a script, in the background. It imports, then waits for `go()`
    (meanwhile the caller may create the tracking store: MLflow's SQLite schema takes
    seconds); `result()` when it is done: {"versions": [v1, v2], "unsafe": v3,
    "answers": {version: {file name: row}}}, as asked."""

    def __init__(self, params_file: Path, images: Path | None = None,
                 unsafe_marker: Path | None = None, promote: str | None = None,
                 env: dict | None = None, versions: int = len(SEEDS)):
        command = [sys.executable, str(Path(__file__)), str(params_file),
                   "--versions", str(versions)]
        if images is not None:
            command += ["--images", str(images)]
        if unsafe_marker is not None:
            command += ["--unsafe", str(unsafe_marker)]
        if promote is not None:
            command += ["--promote", promote]
        # its stderr (a few kB of logs) waits in the pipe until result() reads it
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)

    def go(self) -> Registration:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()  # closed by communicate()
        return self

    def result(self, timeout: float = 300) -> dict:
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, out[-3000:] + err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServingProcess:
    """`visionops serve-model` on a free port, its output in `log`; stop() ends it."""

    def __init__(self, params_file: Path, log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [str(VISIONOPS), "serve-model", "--params", str(params_file),
                 "--port", str(self.port)], env=env, stdout=output, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 60):
        """Poll `condition()` (a truthy value ends the wait) until `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server ended:\n{self.output()[-3000:]}"
            try:
                found = condition()
            except httpx.TransportError:  # not listening yet
                found = None
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{what} not within {timeout} s:\n{self.output()[-3000:]}")

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def wait_version(self, version: str, timeout: float = 60) -> None:
        def serving():
            answer = self.get("/version")
            return answer.status_code == 200 and answer.json()["model_version"] == version
        self.wait_for(serving, f"v{version} served", timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


# -- the script ------------------------------------------------------------------------------
def tiny_model(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255),
                             keras.layers.Flatten(),
                             keras.layers.Dense(len(CLASSES), activation="softmax")])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("params", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--unsafe", type=Path)
    parser.add_argument("--promote")
    parser.add_argument("--versions", type=int, default=len(SEEDS))
    args = parser.parse_args()

    import keras  # noqa: F401  imported before the go: the seconds overlap the caller's
    import mlflow
    import numpy as np

    from visionops.core.config import load_params
    from visionops.core.pipeline import PIXELS
    from visionops.core.predict import image_paths, predict_paths
    from visionops.io.models import load_registered_version, model_requirements, register_model
    from visionops.io.registry import Registry

    params = load_params(args.params)
    sys.stdin.readline()  # go
    mlflow.set_tracking_uri(params.tracking_uri)
    name, experiment = params.registry.model_name, params.mlflow.experiment_name
    if mlflow.get_experiment_by_name(experiment) is None:
        local = params.tracking_uri.startswith("sqlite:")
        mlflow.create_experiment(experiment, params.artifact_location if local else None)
    mlflow.set_experiment(experiment)
    sample = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 1)).astype(np.float32)
    versions = []
    for seed in SEEDS[:args.versions]:
        tags = {"class_names": json.dumps(CLASSES), "input_contract": PIXELS,
                "data_version": f"tiny-{seed}"}
        with mlflow.start_run():
            versions.append(str(register_model(tiny_model(seed), name, sample, tags).version))
    summary = {"versions": versions}
    if args.unsafe:
        with mlflow.start_run():
            info = mlflow.tensorflow.log_model(
                tiny_model(3), name="model", pip_requirements=model_requirements(),
                custom_objects={"trap": OpensFile(str(args.unsafe))})
            summary["unsafe"] = str(mlflow.register_model(info.model_uri, name, tags={
                "class_names": json.dumps(CLASSES), "input_contract": PIXELS}).version)
    if args.images:
        paths = image_paths([args.images])
        summary["answers"] = {
            version: {Path(row["path"]).name: row for row in
                      predict_paths(load_registered_version(params, version), paths)}
            for version in versions}
    if args.promote:
        version = versions[0] if args.promote == "first" else args.promote
        Registry(params).promote(version, "a tiny version to serve", "serving-tests")
    print(json.dumps(summary))
    sys.stdout.flush()
    os._exit(0)  # skip TensorFlow's teardown


if __name__ == "__main__":
    main()
