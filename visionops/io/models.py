"""Models in the MLflow registry: the one way to load a registered version
(`load_registered_version`), registering one, proving it serves from a fresh process,
and exporting a version promoted by hand (visionops.io.exports).

Every load first checks the downloaded files (visionops.core.model_safety) and refuses a
version that carries a pickle or code, and runs with MLflow's pickle loading off."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import infer_signature

from visionops.core.config import Params
from visionops.core.model_safety import UnsafeModelFiles, refuse_unsafe_model
from visionops.core.pipeline import (
    INPUT_CONTRACT_TAG,
    UNIT_FLOAT,
    load_pixels,
    model_input,
    scale_for,
)
from visionops.io.exports import ExportReport, log_exports
from visionops.io.registry import CHAMPION, Registry, RegistryError

# MLflow unpickles a model's custom objects unless this is false (its default is true).
NO_PICKLES = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}


class UnsafeModelError(RegistryError, ValueError):
    """A registered version refused before loading: its files could run code."""


# Imports first, then waits for one request: a JSON line naming the model URI and the
# input and output .npy files. Started ahead (see FreshProcess), its seconds of imports
# overlap the flow's own work. The version is downloaded and its files checked before
# MLflow loads it from that folder.
SERVE_IN_FRESH_PROCESS = r"""
import json
import os
import sys
from pathlib import Path
os.nice(19)  # its imports take the CPU that training and the flow leave idle
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
import mlflow
import numpy as np
import tensorflow
from visionops.core.model_safety import UnsafeModelFiles, refuse_unsafe_model
mlflow.set_tracking_uri(sys.argv[1])
mlflow.search_experiments(max_results=1)  # connects the stores: imports, SQLite schema check
mlflow.search_registered_models(max_results=1)
line = sys.stdin.readline()
if not line:
    sys.exit(0)  # its caller is done without asking
request = json.loads(line)
try:
    os.setpriority(os.PRIO_PROCESS, 0, 0)  # asked: back to normal where allowed (root)
except PermissionError:
    pass
folder = Path(request["outputs"]).parent / "model"
folder.mkdir()
local = mlflow.artifacts.download_artifacts(request["model_uri"], dst_path=str(folder))
try:
    refuse_unsafe_model(Path(local), request["model_uri"])
except UnsafeModelFiles as exc:
    sys.exit(str(exc))
# No requirements check: this process runs in the environment that logged the model.
model = mlflow.pyfunc.load_model(local, suppress_warnings=True)
np.save(request["outputs"], np.asarray(model.predict(np.load(request["inputs"]))))
os._exit(0)  # answered: skip the seconds of TensorFlow's teardown the caller waits for
"""


def _libc_prctl():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the child ends at its stdin's end
        return None


_PRCTL = _libc_prctl() if sys.platform == "linux" else None  # looked up before any fork


def _die_with_parent(parent: int) -> None:
    """In the child, before it runs: the kernel sends it SIGKILL once the thread that
    started it is gone (Linux's PR_SET_PDEATHSIG = 1), so a killed flow leaves no orphan;
    a parent already gone by then ends it at once. Only system calls here: a forked child
    of a threaded process must not import."""
    _PRCTL(1, 9)
    if os.getppid() != parent:
        os._exit(1)


class FreshProcess:
    """A new Python process that will load a registered version through mlflow.pyfunc,
    as a server would, sharing nothing with this one; start it early, ask it once."""

    def __init__(self, tracking_uri: str):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE_IN_FRESH_PROCESS, tracking_uri],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **NO_PICKLES},
            preexec_fn=(functools.partial(_die_with_parent, os.getpid())
                        if _PRCTL is not None else None))

    def predict(self, model_uri: str, sample: np.ndarray, timeout: float = 600
                ) -> np.ndarray | str:
        """Its predictions for `sample`, or why it could not make them."""
        with tempfile.TemporaryDirectory() as scratch:
            inputs, outputs = Path(scratch) / "in.npy", Path(scratch) / "out.npy"
            np.save(inputs, sample)
            request = {"model_uri": model_uri, "inputs": str(inputs), "outputs": str(outputs)}
            _, stderr = self.process.communicate(json.dumps(request) + "\n", timeout=timeout)
            if self.process.returncode != 0 or not outputs.exists():
                last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
                return f"{model_uri} failed to load or predict in a fresh process: {last}"
            return np.load(outputs)

    def __enter__(self) -> FreshProcess:
        return self

    def __exit__(self, *_) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def model_requirements() -> list[str]:
    """What serving the model needs, pinned to this environment. Given explicitly, MLflow
    skips inferring them, which loads the model again in a subprocess (seconds)."""
    import keras

    return [*mlflow.tensorflow.get_default_pip_requirements(), f"keras=={keras.__version__}"]


def register_model(model, model_name: str, sample: np.ndarray, tags: dict[str, str]
                   ) -> ModelVersion:
    """Log the model to the active run and register it, with signature and input example.
    The version is created with its tags in one call: a version without its lineage
    would not be recognised by the next run, which would train it again."""
    signature = infer_signature(sample, model.predict(sample, verbose=0))
    info = mlflow.tensorflow.log_model(model, name="model", signature=signature,
                                       input_example=sample,
                                       pip_requirements=model_requirements())
    return mlflow.register_model(info.model_uri, model_name, tags=tags)


def check_servable(model_uri: str, tracking_uri: str, sample: np.ndarray,
                   expected: np.ndarray, tolerance: float = 1e-5,
                   fresh: FreshProcess | None = None) -> str | None:
    """Load `model_uri` through mlflow.pyfunc in a fresh Python process (`fresh`, started
    earlier, or a new one) and predict `sample`; None when it matches `expected`, else
    the reason it does not."""
    with fresh or FreshProcess(tracking_uri) as process:
        served = process.predict(model_uri, sample)
    if isinstance(served, str):
        return served
    if served.shape != expected.shape:
        return f"{model_uri} served shape {served.shape}, expected {expected.shape}"
    difference = float(np.max(np.abs(served - expected))) if served.size else 0.0
    if difference > tolerance:
        return f"{model_uri} served predictions differ by up to {difference:.2e}"
    return None


def ensure_exports(params: Params, version: str,
                   sample_files: Callable[[], Sequence[str | Path]]) -> ExportReport | None:
    """Export a registered version (params.export's formats) into its run's `export/`
    artifacts, each checked against its Keras model on the first 8 of `sample_files()`
    (asked for only when exporting), the figures logged as the run's metrics, unless the
    run has exports already, as for a version promoted by hand; None when it had. A
    ValueError when there are no images to check the exports on."""
    registry = Registry(params)
    run_id = registry.version(version).run_id
    if registry.client.list_artifacts(run_id, "export"):
        return None
    files = list(sample_files())[:8]
    if not files:
        raise ValueError(f"v{version} not exported: no test images to check the exports on")
    loaded = load_registered_version(params, version)
    size, channels = model_input(loaded.model)
    sample = scale_for(load_pixels(files, size, channels), loaded.input_contract)
    return log_exports(registry.client, run_id, loaded.model, sample, params.export.formats,
                       params.export.tolerance)

@dataclass
class LoadedVersion:
    model: object
    class_names: list[str] | None  # None: the version has no `class_names` tag
    version: str
    # what its model takes (visionops.core.pipeline): raw pixels, or, for a version
    # registered before models rescaled inside, [0, 1] floats (it has no tag)
    input_contract: str = UNIT_FLOAT
    data_version: str = ""  # the DVC md5 of the dataset it was trained on ("": untagged)
    run_id: str = ""        # the MLflow run that logged it


def load_champion(params: Params) -> LoadedVersion:
    """The champion's model and class names, both from the one version the alias named
    when it was read, so that an alias moving meanwhile cannot mix two versions."""
    registry = Registry(params)
    champion = registry.champion()
    if champion is None:
        raise RegistryError(f"{registry.name} has no {CHAMPION} yet: run `visionops retrain`")
    loaded = load_registered_version(params, champion.version)
    if loaded.class_names is None:
        raise RegistryError(f"{registry.name} v{loaded.version} has no class_names tag, so "
                            "its outputs cannot be named")
    return loaded


def load_registered_version(params: Params, version: str | int) -> LoadedVersion:
    """The Keras model of one registered version and the class names it predicts, read
    from params' tracking URI, whatever MLflow's process-wide default is. An
    UnsafeModelError, naming the version and its files, for a version that carries a
    pickle or code: nothing of it is then loaded."""
    import mlflow

    registry = Registry(params)
    model_version = registry.version(version)
    # A `models:/` URI would be resolved against MLflow's default registry, whatever
    # tracking URI is passed along with it: ask this registry where the files are.
    files = registry.client.get_model_version_download_uri(model_version.name,
                                                           model_version.version)
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(files, dst_path=scratch,
                                                    tracking_uri=params.tracking_uri)
        try:
            refuse_unsafe_model(Path(local), f"v{model_version.version} of {model_version.name}")
        except UnsafeModelFiles as exc:
            raise UnsafeModelError(str(exc)) from exc
        os.environ.update(NO_PICKLES)
        model = mlflow.tensorflow.load_model(local, keras_model_kwargs={"safe_mode": True})
    class_names = model_version.tags.get("class_names")
    return LoadedVersion(model, json.loads(class_names) if class_names else None,
                         str(model_version.version),
                         model_version.tags.get(INPUT_CONTRACT_TAG, UNIT_FLOAT),
                         model_version.tags.get("data_version", ""), model_version.run_id or "")
