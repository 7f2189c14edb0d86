"""`models compare` and `predict` read the registry that params.yaml names, from any working
folder and whatever MLflow's own default tracking URI is; `predict` takes its model and
its class names from one version."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from projects import write_params
from typer.testing import CliRunner

from visionops.cli import app
from visionops.core.config import load_params
from visionops.core.demo import write_digits
from visionops.core.pipeline import load_pixels
from visionops.io.models import load_champion, register_model
from visionops.io.registry import CHAMPION, Registry

V1_CLASSES, V2_CLASSES = ["0", "1", "2"], ["2", "1", "0"]


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(3, activation="softmax")])


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> tuple[Path, dict[str, keras.Model]]:
    """A project whose params.yaml names `sqlite:///mlflow.db` in its own folder, with two
    registered versions, v2 champion."""
    root = tmp_path_factory.mktemp("registered") / "project"
    write_digits(root / "data", per_class=10, labels=range(3))
    params = load_params(write_params(root))
    models = {"1": tiny_model(1), "2": tiny_model(2)}
    sample = np.zeros((1, 28, 28, 1), dtype=np.float32)
    with _use_tracking_uri(params.tracking_uri):
        experiment_id = mlflow.create_experiment(params.mlflow.experiment_name,
                                                 artifact_location=params.artifact_location)
        for version, classes in (("1", V1_CLASSES), ("2", V2_CLASSES)):
            with mlflow.start_run(experiment_id=experiment_id):
                registered = register_model(models[version], params.registry.model_name,
                                            sample, {"class_names": json.dumps(classes)})
            assert str(registered.version) == version
    return root, models


@pytest.fixture
def project(registered, tmp_path, monkeypatch) -> tuple[Path, dict[str, keras.Model]]:
    """That project with v2 champion, seen from a working folder elsewhere whose default
    tracking URI is another, empty store."""
    root, models = registered
    params = load_params(root / "params.yaml")
    Registry(params).client.set_registered_model_alias(params.registry.model_name, CHAMPION,
                                                       "2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    return root, models


def cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_models_compare_loads_both_versions_from_the_params_store(project):
    root, _ = project
    table = cli("models", "compare", "1", "2", "--params", str(root / "params.yaml"), "--json")
    assert table["versions"] == ["1", "2"]
    assert table["test_images"] > 0
    assert set(table["metrics"]["accuracy"]) == {"1", "2"}
    assert not (Path.cwd() / "other.db").exists()  # the default store was never opened


def test_predict_uses_the_params_store_from_another_folder(project):
    root, models = project
    image = next((root / "data" / "1").iterdir())
    answer = cli("predict", str(image), "--params", str(root / "params.yaml"), "--json")
    assert answer["champion_version"] == "2"
    expected = models["2"].predict(load_pixels([image], 28, 1) / 255, verbose=0)[0]
    assert answer["predictions"][0]["label"] == V2_CLASSES[int(np.argmax(expected))]


def test_predict_takes_model_and_class_names_from_one_version(project, monkeypatch):
    root, models = project
    params = load_params(root / "params.yaml")
    read_champion = Registry.champion

    def champion_then_a_rollback_lands(self):
        found = read_champion(self)
        self.client.set_registered_model_alias(self.name, CHAMPION, "1")
        return found

    monkeypatch.setattr(Registry, "champion", champion_then_a_rollback_lands)
    loaded = load_champion(params)
    assert (loaded.version, loaded.class_names) == ("2", V2_CLASSES)
    x = load_pixels(sorted((root / "data" / "0").iterdir())[:4], 28, 1) / 255
    np.testing.assert_allclose(loaded.model.predict(x, verbose=0),
                               models["2"].predict(x, verbose=0), rtol=1e-6)
