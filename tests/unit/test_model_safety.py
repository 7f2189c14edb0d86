"""A registered version that carries a pickle, code or a Keras lambda is refused on
every path that loads a model, before anything of it runs; a normal one still loads.

The crafted versions are real: logged by MLflow into a SQLite store (a pickle made by
`mlflow.tensorflow.log_model(custom_objects=...)`, a file dropped into a version's
artifacts, a Lambda layer), each creating a marker file if its code ever ran."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from visionops.core.config import Params
from visionops.core.model_safety import (
    UnsafeModelFiles,
    load_keras_file,
    model_folder_findings,
)
from visionops.io.models import (
    UnsafeModelError,
    check_servable,
    ensure_exports,
    load_champion,
    load_registered_version,
    model_requirements,
    register_model,
)
from visionops.io.registry import Registry
from visionops.jobs.scoring import compare_versions
from visionops.jobs.stages import evaluate

NAME = "safety-digits"
CLASSES = ["0", "1", "2"]
PICKLE = "data/custom_objects.cloudpickle"
REPO = Path(__file__).resolve().parents[2]


class CreatesMarker:
    """Unpickled, it creates the file at `path`: what a crafted artifact would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(3, activation="softmax")])


def lambda_model(marker: Path) -> keras.Model:
    """Its lambda creates `marker` whenever it runs: when the model is built or rebuilt."""
    inputs = keras.Input((8, 8, 1))
    touched = keras.layers.Lambda(lambda x, path=str(marker): (open(path, "w").close(), x)[1],
                                  name="touches_a_file")(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(touched))
    return keras.Model(inputs, outputs)


def sample() -> np.ndarray:
    return np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)


@pytest.fixture
def params(tracking, tmp_path, tiny_digits) -> Params:
    _, experiment_id = tracking
    mlflow.set_experiment(experiment_id=experiment_id)
    return Params(registry={"model_name": NAME}, data={"path": "data", "image_size": 8},
                  mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                          "experiment_name": "unit"}, root=tmp_path)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def register(model, **log_model_kwargs) -> str:
    """The version number of `model`, registered with class names as the flow does."""
    tags = {"class_names": json.dumps(CLASSES)}
    with mlflow.start_run():
        if not log_model_kwargs:
            return str(register_model(model, NAME, sample(), tags).version)
        signature = infer_signature(sample(), model.predict(sample(), verbose=0))
        info = mlflow.tensorflow.log_model(model, name="model", signature=signature,
                                           pip_requirements=model_requirements(),
                                           **log_model_kwargs)
        return str(mlflow.register_model(info.model_uri, NAME, tags=tags).version)


def artifact_folder(params: Params, version: str) -> Path:
    """Where the version's files lie in the local artifact store."""
    uri = Registry(params).client.get_model_version_download_uri(NAME, version)
    return Path(uri.removeprefix("file://"))


def register_pickled(params, marker) -> str:
    version = register(tiny_model(), custom_objects={"trap": CreatesMarker(marker)})
    assert (artifact_folder(params, version) / PICKLE).is_file()
    assert not marker.exists()
    return version


def assert_refused(message: str, version: str, file: str) -> None:
    assert "refused to load" in message, message
    assert f"v{version} of {NAME}" in message or f"models:/{NAME}/{version}" in message
    assert file in message, message


def test_a_pickled_version_is_refused_on_every_load_path_in_this_process(params, marker,
                                                                         tiny_digits):
    safe = register(tiny_model(1))
    pickled = register_pickled(params, marker)
    Registry(params).promote(pickled, "crafted", "tester")

    with pytest.raises(UnsafeModelError) as registry_load:
        load_registered_version(params, pickled)
    assert_refused(str(registry_load.value), pickled, PICKLE)
    with pytest.raises(UnsafeModelError) as champion:  # `visionops predict`, the predict flow
        load_champion(params)
    assert_refused(str(champion.value), pickled, PICKLE)
    with pytest.raises(UnsafeModelError) as compared:  # `visionops models compare`
        compare_versions(params, [safe, pickled])
    assert_refused(str(compared.value), pickled, PICKLE)
    image = next(tiny_digits.rglob("*.png"))
    with pytest.raises(UnsafeModelError) as exported:  # a promotion by hand exports it
        ensure_exports(params, pickled, lambda: [image])
    assert_refused(str(exported.value), pickled, PICKLE)
    assert not marker.exists()

    # The artifact is a real trap: unpickled, it runs.
    with open(artifact_folder(params, pickled) / PICKLE, "rb") as handle:
        pickle.load(handle)  # noqa: S301 - proving the crafted file is dangerous
    assert marker.exists()


def test_a_pickled_version_is_refused_by_the_serve_check_in_its_fresh_process(params,
                                                                               marker):
    pickled = register_pickled(params, marker)
    problem = check_servable(f"models:/{NAME}/{pickled}", params.tracking_uri, sample(),
                             np.zeros((2, 3), np.float32))
    assert problem is not None
    assert_refused(problem, pickled, PICKLE)
    assert not marker.exists()


def test_the_cli_refuses_a_pickled_champion_even_with_pickles_allowed_in_its_env(
        params, marker, tmp_path, tiny_digits):
    pickled = register_pickled(params, marker)
    Registry(params).promote(pickled, "crafted", "tester")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({
        "registry": {"model_name": NAME}, "data": {"path": "data", "image_size": 8},
        "mlflow": {"tracking_uri": params.tracking_uri, "experiment_name": "unit"}}))
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "visionops"), "predict", str(tiny_digits),
         "--params", str(params_file)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert_refused(result.stderr, pickled, PICKLE)
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_a_pickle_dropped_into_a_normal_versions_files_is_refused(params, marker):
    version = register(tiny_model())
    with open(artifact_folder(params, version) / "data" / "extra.pkl", "wb") as handle:
        pickle.dump(CreatesMarker(marker), handle)
    with pytest.raises(UnsafeModelError) as refused:
        load_registered_version(params, version)
    assert_refused(str(refused.value), version, "data/extra.pkl")
    assert not marker.exists()


def test_a_version_with_a_lambda_layer_is_refused_before_keras_runs_it(params, marker):
    version = register(lambda_model(marker))
    marker.unlink()  # building the model ran the lambda once
    with pytest.raises(UnsafeModelError) as refused:
        load_registered_version(params, version)
    assert_refused(str(refused.value), version, "data/model.keras")
    assert "Lambda layer 'touches_a_file'" in str(refused.value)
    problem = check_servable(f"models:/{NAME}/{version}", params.tracking_uri, sample(),
                             np.zeros((2, 3), np.float32))
    assert problem is not None and "Lambda layer 'touches_a_file'" in problem
    assert not marker.exists()


def test_the_dvc_evaluate_stage_refuses_a_lambda_model_file(params, marker):
    model_file = params.root / "reports" / "model.keras"
    model_file.parent.mkdir(parents=True)
    lambda_model(marker).save(model_file)
    marker.unlink()
    with pytest.raises(UnsafeModelFiles) as refused:
        evaluate(params)
    assert str(model_file) in str(refused.value)
    assert "Lambda layer 'touches_a_file'" in str(refused.value)
    assert not marker.exists()


def test_a_normal_keras_file_loads_in_safe_mode(tmp_path):
    model = tiny_model(2)
    model.save(tmp_path / "model.keras")
    np.testing.assert_allclose(load_keras_file(tmp_path / "model.keras").predict(sample()),
                               model.predict(sample()), rtol=1e-6)


def test_a_normal_version_still_loads_predicts_and_serves(params):
    model = tiny_model(3)
    version = register(model)
    Registry(params).promote(version, "normal", "tester")
    expected = model.predict(sample(), verbose=0)
    for loaded in (load_registered_version(params, version), load_champion(params)):
        assert loaded.version == version and loaded.class_names == CLASSES
        np.testing.assert_allclose(loaded.model.predict(sample(), verbose=0), expected,
                                   rtol=1e-6)
    assert check_servable(f"models:/{NAME}/{version}", params.tracking_uri, sample(),
                          expected) is None


@pytest.fixture(scope="module")
def saved_model_folder(tmp_path_factory) -> Path:
    """A model folder as mlflow.tensorflow saves it, to tamper with copies of."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    mlflow.tensorflow.save_model(tiny_model(), str(folder),
                                 pip_requirements=model_requirements())
    return folder


def _set_flavor(folder: Path, flavor: str, key: str, value) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"][flavor][key] = value
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _drop_setting(folder: Path, flavor: str, key: str) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    del mlmodel["flavors"][flavor][key]
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def _add_flavor(folder: Path, flavor: str, settings: dict) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"][flavor] = settings
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


TAMPERINGS = {
    "python_function loader_module is 'mlflow.pyfunc.model'":
        lambda f: _set_flavor(f, "python_function", "loader_module", "mlflow.pyfunc.model"),
    "MLmodel puts 'code' on the import path":
        lambda f: _set_flavor(f, "python_function", "code", "code"),
    "data/keras_module.txt is 'evil'":
        lambda f: (f / "data" / "keras_module.txt").write_text("evil"),
    "tensorflow save_format is 'h5'":
        lambda f: _set_flavor(f, "tensorflow", "save_format", "h5"),
    "tensorflow data is '/tmp'":
        lambda f: _set_flavor(f, "tensorflow", "data", "/tmp"),
    "code/evil.py is Python code":
        lambda f: (f / "code").mkdir() or (f / "code" / "evil.py").write_text("x = 1"),
    "data/global_custom_objects.cloudpickle is a pickle":
        lambda f: (f / "data" / "global_custom_objects.cloudpickle").write_bytes(b"\x80\x04N."),
    # MLflow loads a TF1 estimator's SavedModel when model_type is absent
    "tensorflow model_type is missing":
        lambda f: _set_flavor(f, "tensorflow", "saved_model_dir", "tfmodel")
        or _drop_setting(f, "tensorflow", "model_type"),
    # mlflow.tensorflow reads a 'keras' flavor in place of 'tensorflow'
    "MLmodel has a 'keras' flavor":
        lambda f: _add_flavor(f, "keras", {"model_type": "tf2-module",
                                           "saved_model_dir": "tfmodel"}),
    "tensorflow model_type is 'tf2-module'":
        lambda f: _set_flavor(f, "tensorflow", "model_type", "tf2-module"),
    "tensorflow save_format is missing":
        lambda f: _drop_setting(f, "tensorflow", "save_format"),
    "data/save_format.txt is missing":
        lambda f: (f / "data" / "save_format.txt").unlink(),
    "python_function loader_module is missing":
        lambda f: _drop_setting(f, "python_function", "loader_module"),
    "tfmodel/saved_model.pb is a TensorFlow SavedModel":
        lambda f: (f / "tfmodel").mkdir() or (f / "tfmodel" / "saved_model.pb").write_bytes(b""),
    "data/model/variables/ is a TensorFlow SavedModel folder":
        lambda f: (f / "data" / "model" / "variables").mkdir(parents=True),
    "data/model.keras is missing":
        lambda f: (f / "data" / "model.keras").unlink(),
    "data/MLmodel is a second MLmodel":
        lambda f: shutil.copy(f / "MLmodel", f / "data" / "MLmodel"),
}


def test_a_saved_model_folder_as_mlflow_writes_it_has_no_findings(saved_model_folder):
    assert model_folder_findings(saved_model_folder) == []


@pytest.mark.parametrize("finding", TAMPERINGS)
def test_each_way_to_make_a_model_folder_run_code_is_found(saved_model_folder, tmp_path,
                                                            finding):
    folder = shutil.copytree(saved_model_folder, tmp_path / "model")
    TAMPERINGS[finding](folder)
    assert any(finding in found for found in model_folder_findings(folder)), \
        model_folder_findings(folder)


def test_mlflow_itself_refuses_the_pickle_once_visionops_is_imported(params, marker):
    pickled = register_pickled(params, marker)
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
    with pytest.raises(MlflowException, match="cloudpickle is disallowed"):
        mlflow.tensorflow.load_model(str(artifact_folder(params, pickled)))
    assert not marker.exists()


def test_importing_visionops_turns_pickle_loading_off_whatever_the_env_says():
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    shown = subprocess.run(
        [sys.executable, "-c", "import os, visionops; "
         "print(os.environ['MLFLOW_ALLOW_PICKLE_DESERIALIZATION'])"],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    assert shown.stdout.strip() == "false"


def test_no_code_turns_keras_safe_mode_off():
    sources = [path for folder in ("visionops", "flows", "tasks")
               for path in (REPO / folder).rglob("*.py")]
    offending = [str(path) for path in sources
                 if "safe_mode=False" in path.read_text()
                 or "enable_unsafe_deserialization" in path.read_text()]
    assert offending == []
