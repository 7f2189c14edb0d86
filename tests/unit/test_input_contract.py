"""A champion registered before models took raw pixels (it takes [0, 1] floats and has
no `input_contract` tag) is still scored and served correctly after the change."""

import dataclasses
import json

import keras
import mlflow
import numpy as np
import pytest

from visionops.core.config import Params
from visionops.core.metrics import evaluate_model
from visionops.core.pipeline import INPUT_CONTRACT_TAG, PIXELS, UNIT_FLOAT, load_pixels
from visionops.core.predict import predict_paths
from visionops.io.models import load_registered_version, register_model

NAME = "contract-digits"
CLASSES = ["0", "1", "2"]


@pytest.fixture
def params(tracking, tmp_path):
    _, experiment_id = tracking
    mlflow.set_experiment(experiment_id=experiment_id)
    return Params(registry={"model_name": NAME},
                  mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                          "experiment_name": "unit"}, root=tmp_path)


@pytest.fixture
def digits(tmp_path, digits_folder):
    data_dir = digits_folder(tmp_path / "data", per_class=15, keep=tuple(CLASSES))
    paths = sorted(p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*.png"))
    y = np.array([CLASSES.index(p.split("/")[0]) for p in paths])
    return data_dir, paths, y


def legacy_model(data_dir, paths, y) -> keras.Model:
    """Trained as models were before the change: on [0, 1] floats, no Rescaling inside."""
    keras.utils.set_random_seed(0)
    x = load_pixels([data_dir / p for p in paths], 16, 1) / 255.0
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=30, verbose=0)
    return model


def register(model, sample, **tags):
    with mlflow.start_run():
        return register_model(model, NAME, sample, {"class_names": json.dumps(CLASSES), **tags})


def test_a_champion_from_before_the_change_is_scored_and_served(params, digits):
    data_dir, paths, y = digits
    model = legacy_model(data_dir, paths, y)
    sample = load_pixels([data_dir / p for p in paths[:2]], 16, 1) / 255.0
    register(model, sample.astype(np.float32))  # no input_contract tag, as v1 had none

    loaded = load_registered_version(params, "1")
    assert loaded.input_contract == UNIT_FLOAT
    scored = evaluate_model(loaded.model, data_dir, paths, y, CLASSES, loaded.class_names,
                            loaded.input_contract)
    assert scored.metrics["accuracy"] >= 0.9

    files = [data_dir / p for p in paths]
    rows = list(predict_paths(loaded, files))
    expected = model.predict(load_pixels(files, 16, 1) / 255.0, verbose=0)
    assert [row["label"] for row in rows] == [CLASSES[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose([row["probability"] for row in rows], expected.max(axis=1),
                               rtol=1e-5)
    # Fed raw pixels, as new models are, it would answer otherwise: the contract matters.
    misfed = list(predict_paths(dataclasses.replace(loaded, input_contract=PIXELS), files))
    assert not np.allclose([row["probability"] for row in misfed], expected.max(axis=1),
                           rtol=1e-3)


def test_a_new_version_records_that_it_takes_raw_pixels(params, digits):
    data_dir, paths, _ = digits
    model = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Flatten(), keras.layers.Dense(3, "softmax")])
    sample = load_pixels([data_dir / p for p in paths[:2]], 16, 1).astype(np.float32)
    register(model, sample, **{INPUT_CONTRACT_TAG: PIXELS})
    assert load_registered_version(params, "1").input_contract == PIXELS
