import json
import tempfile

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from visionops.core.config import Params
from visionops.io.models import load_registered_version, register_model
from visionops.io.registry import Registry

NAME = "unit-digits"
CLASSES = ["0", "1", "2"]


@pytest.fixture
def registry(tracking, tmp_path) -> Registry:
    return Registry(Params(registry={"model_name": NAME},
                           mlflow={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                                   "experiment_name": "unit"}, root=tmp_path))


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(3, activation="softmax")])


def sample() -> np.ndarray:
    return np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)


def register(experiment_id, model, **tags):
    with mlflow.start_run(experiment_id=experiment_id):
        return register_model(model, NAME, sample(),
                              {"class_names": json.dumps(CLASSES), **tags})


def test_register_model_creates_a_version_with_tags(tracking, registry):
    client, experiment_id = tracking
    version = register(experiment_id, tiny_model(1), data_version="abc.dir")
    assert version.name == NAME
    assert str(version.version) == "1"
    assert version.tags["data_version"] == "abc.dir"
    assert json.loads(version.tags["class_names"]) == CLASSES
    assert client.get_registered_model(NAME).name == NAME
    assert registry.champion() is None


def test_champion_is_none_for_an_unknown_model(registry):
    assert registry.champion() is None


def test_promote_moves_the_champion_alias_and_records_the_replaced_version(tracking,
                                                                          registry):
    client, experiment_id = tracking
    first = register(experiment_id, tiny_model(1))
    second = register(experiment_id, tiny_model(2))
    assert (str(first.version), str(second.version)) == ("1", "2")

    registry.promote(first.version, "first", "tester")
    assert str(registry.champion().version) == "1"

    registry.promote(second.version, "better", "tester")
    assert str(registry.champion().version) == "2"
    assert client.get_model_version(NAME, "2").aliases == ["champion"]
    assert client.get_model_version(NAME, "1").aliases == []
    assert [(e["from_version"], e["to_version"]) for e in registry.history()] == [
        ("", "1"), ("1", "2")]


def test_load_registered_version_returns_an_equivalent_model_and_class_names(tracking,
                                                                           registry):
    _, experiment_id = tracking
    model = tiny_model(3)
    version = register(experiment_id, model)
    loaded_version = load_registered_version(registry.params, version.version)
    loaded = loaded_version.model
    assert loaded_version.class_names == CLASSES
    assert loaded_version.version == str(version.version)
    assert loaded.input_shape == (None, 28, 28, 1)
    x = sample()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)


def test_load_registered_version_without_class_names_tag(tracking, registry):
    client, experiment_id = tracking
    with mlflow.start_run(experiment_id=experiment_id):
        version = register_model(tiny_model(4), NAME, sample(), {})
    assert load_registered_version(registry.params, version.version).class_names is None


def test_servability_is_checked_in_a_fresh_process_from_the_registry(tracking, tmp_path):
    from visionops.io.models import check_servable

    _, experiment_id = tracking
    model = tiny_model(5)
    version = register(experiment_id, model)
    uri, store = f"models:/{NAME}/{version.version}", f"sqlite:///{tmp_path}/mlflow.db"
    x = sample()
    expected = model.predict(x, verbose=0)

    assert check_servable(uri, store, x, expected) is None
    problem = check_servable(uri, store, x, expected + 0.01)
    assert problem is not None and "differ by up to 1.00e-02" in problem
    missing = check_servable(f"models:/{NAME}/99", store, x, expected)
    assert missing is not None and "failed to load or predict in a fresh process" in missing


def test_the_serve_check_takes_paths_and_names_with_spaces(tmp_path, monkeypatch):
    from visionops.io.models import check_servable

    spaced = tmp_path / "a store with spaces"
    (spaced / "scratch files").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(spaced / "scratch files"))  # sample, answer
    store = f"sqlite:///{spaced}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model, x = tiny_model(6), sample()
    with _use_tracking_uri(store):
        experiment_id = mlflow.create_experiment(
            "spaced", artifact_location=(spaced / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment_id):
            version = register_model(model, "unit digits", x, {})
    uri = f"models:/unit digits/{version.version}"
    assert check_servable(uri, store, x, model.predict(x, verbose=0)) is None


def test_the_fresh_process_dies_with_a_flow_killed_outright(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    flow = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom visionops.io.models import FreshProcess\n"
        f"process = FreshProcess('sqlite:///{tmp_path}/mlflow.db')\n"
        "print(process.process.pid, flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    fresh = psutil.Process(int(flow.stdout.readline()))
    flow.send_signal(signal.SIGKILL)
    flow.wait()
    deadline = time.monotonic() + 2  # its imports alone take longer: it must be killed
    while time.monotonic() < deadline:
        try:
            if fresh.status() == psutil.STATUS_ZOMBIE:  # dead; its new parent may not reap
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        fresh.kill()
        raise AssertionError("the serve check's process outlived the killed flow")


def test_log_exports_uploads_what_it_published_and_logs_the_figures(tracking):
    from visionops.io.exports import log_exports

    client, experiment_id = tracking
    model = tiny_model(7)
    version = register(experiment_id, model)
    report = log_exports(client, version.run_id, model, sample(), ["saved_model", "onnx"],
                         tolerance=1e-5)
    assert report.refused == {}
    assert sorted(a.path for a in client.list_artifacts(version.run_id, "export")) == [
        "export/model.onnx", "export/saved_model"]
    assert "export/saved_model/saved_model.pb" in {
        a.path for a in client.list_artifacts(version.run_id, "export/saved_model")}
    run = client.get_run(version.run_id)
    assert run.data.metrics["export_onnx_argmax_agreement"] == 1.0
    assert run.data.metrics["export_onnx_max_abs_diff"] <= 1e-5
    assert run.data.metrics["export_saved_model_published"] == 1.0
    assert "export_tflite_published" not in run.data.metrics  # not asked for
    assert run.data.tags["export.onnx"] == "published"


def test_log_exports_leaves_a_refused_export_out_and_says_why(tracking):
    from visionops.io.exports import log_exports

    client, experiment_id = tracking
    model = tiny_model(8)
    version = register(experiment_id, model)
    # checked against another model's predictions, as a conversion gone wrong would give
    other = tiny_model(9).predict(sample(), verbose=0)
    report = log_exports(client, version.run_id, model, sample(), ["onnx"], tolerance=1e-4,
                         expected=other)
    assert report.published == [] and "onnx" in report.refused
    assert client.list_artifacts(version.run_id, "export") == []
    run = client.get_run(version.run_id)
    assert run.data.metrics["export_onnx_published"] == 0.0
    assert run.data.metrics["export_onnx_max_abs_diff"] > 1e-4
    assert run.data.tags["export.onnx"] == report.refused["onnx"]


def test_ensure_exports_exports_a_version_promoted_by_hand_once(tracking, registry, tmp_path,
                                                                 make_image):
    from visionops.io.models import ensure_exports

    client, experiment_id = tracking
    version = register(experiment_id, tiny_model(9))  # no input_contract tag: [0, 1] floats
    files = [make_image(tmp_path / f"{i}.png", size=(28, 28), seed=i) for i in range(3)]
    report = ensure_exports(registry.params, str(version.version), lambda: files)
    assert report.refused == {}
    assert {a.path for a in client.list_artifacts(version.run_id, "export")} == {
        "export/saved_model", "export/model.tflite", "export/model.onnx"}
    assert client.get_run(version.run_id).data.metrics["export_onnx_published"] == 1.0
    assert ensure_exports(registry.params, str(version.version), lambda: 1 / 0) is None  # not read
