"""A better challenger is promoted (and exported); the registry keeps the history of
alias moves; rollback restores the previous champion; racing promotions stay
consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from projects import make_project, write_params

from flows.retrain import retrain
from visionops.core.config import load_params
from visionops.io.exports import onnx_predict, tflite_predict
from visionops.io.registry import Registry

BAD_MODEL = {"train": {"epochs": 1, "learning_rate": 1e-5},
             "gate": {"min_accuracy": 0.0, "min_f1_macro": 0.0, "min_class_recall": 0.0}}


@pytest.fixture(scope="module")
def promoted(tmp_path_factory, prefect_server):
    """A weak first champion (v1), then a good challenger (v2) promoted over it."""
    root = make_project(tmp_path_factory.mktemp("promotion") / "project")
    weak = retrain(params_path=str(write_params(root, BAD_MODEL, name="params-weak.yaml")))
    strong = retrain(params_path=str(root / "params.yaml"))
    return root, weak, strong


def visionops(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("visionops")), *args,
                           "--params", str(root / "params.yaml")], cwd=root,
                          capture_output=True, text=True, timeout=300)


def test_better_challenger_is_promoted_with_a_significant_gain(promoted):
    root, weak, strong = promoted
    assert weak["decision"] == "first_champion"
    assert strong["decision"] == "promoted", strong["reason"]
    assert "McNemar exact one-sided p=" in strong["reason"]
    registry = Registry(load_params(root / "params.yaml"))
    assert str(registry.champion().version) == str(strong["model_version"])
    assert str(registry.alias("challenger").version) == str(strong["model_version"])
    assert registry.history()[-1]["from_version"] == str(weak["model_version"])
    assert "champion" not in registry.version(weak["model_version"]).aliases
    run = mlflow.MlflowClient(strong["tracking_uri"]).get_run(strong["run_id"])
    assert run.data.metrics["mcnemar_p_value"] < 0.05
    assert run.data.tags["gate.servable"] == "passed"


def test_exported_tflite_agrees_with_the_keras_model(promoted, tmp_path):
    root, _, strong = promoted
    mlflow.set_tracking_uri(strong["tracking_uri"])
    exported = Path(mlflow.artifacts.download_artifacts(
        run_id=strong["run_id"], artifact_path="export", dst_path=str(tmp_path)))
    assert (exported / "saved_model" / "saved_model.pb").exists()
    model = mlflow.tensorflow.load_model(f"models:/tiny-digits/{strong['model_version']}")
    x = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1)).astype(np.float32)
    keras_says = model.predict(x, verbose=0)
    np.testing.assert_allclose(tflite_predict(exported / "model.tflite", x), keras_says,
                               atol=1e-5)
    np.testing.assert_allclose(onnx_predict(exported / "model.onnx", x), keras_says,
                               atol=1e-5)
    run = mlflow.MlflowClient(strong["tracking_uri"]).get_run(strong["run_id"])
    assert run.data.metrics["export_onnx_argmax_agreement"] == 1.0
    assert run.data.tags["export.onnx"] == "published"


def test_list_shows_versions_aliases_and_metrics(promoted):
    root, weak, strong = promoted
    result = visionops(root, "models", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["version"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {str(weak["model_version"]), str(strong["model_version"])}
    assert set(rows[str(strong["model_version"])]["aliases"]) == {"champion", "challenger"}
    assert rows[str(strong["model_version"])]["metrics"]["accuracy"] == pytest.approx(
        strong["metrics"]["accuracy"], abs=1e-4)
    assert rows[str(strong["model_version"])]["promoted"]

    table = visionops(root, "models", "list")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["version", "aliases", "accuracy"]
    strong_line = next(line for line in lines
                       if line.split()[0] == str(strong["model_version"]))
    assert strong_line.split()[1] in ("champion,challenger", "challenger,champion")


def test_compare_scores_both_on_the_current_test_split(promoted):
    root, weak, strong = promoted
    result = visionops(root, "models", "compare", str(weak["model_version"]),
                       str(strong["model_version"]), "--json")
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    accuracy = table["metrics"]["accuracy"]
    assert accuracy[str(strong["model_version"])] == pytest.approx(strong["metrics"]["accuracy"])
    assert accuracy[str(weak["model_version"])] < accuracy[str(strong["model_version"])]


def test_predict_labels_images_with_the_champion(promoted):
    root, _, strong = promoted
    one_file = sorted((root / "data" / "1").iterdir())[0]
    result = visionops(root, "predict", str(root / "data" / "2"), str(one_file), "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["champion_version"] == str(strong["model_version"])
    rows = output["predictions"]
    assert len(rows) == 26 and rows[-1]["path"] == str(one_file)
    assert sum(row["label"] == "2" for row in rows[:-1]) >= 20
    model = mlflow.tensorflow.load_model(f"models:/tiny-digits/{strong['model_version']}")
    from visionops.core.pipeline import load_pixels

    # a version trained now takes raw pixels
    expected = model.predict(load_pixels([one_file], 28, 1).astype(np.float32), verbose=0)[0]
    assert rows[-1]["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_predict_flow_writes_a_csv_for_a_folder(promoted, tmp_path):
    root, _, _ = promoted
    out = tmp_path / "labels.csv"
    result = visionops(root, "predict", str(root / "data" / "3"), "--csv", str(out))
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "path,label,probability" and len(lines) == 26
    assert sum(line.split(",")[1] == "3" for line in lines[1:]) >= 20


def test_predict_without_a_champion_says_so(tmp_path):
    root = make_project(tmp_path / "empty")
    result = visionops(root, "predict", str(root / "data" / "0"))
    assert result.returncode == 1
    assert "no champion yet" in result.stderr


def test_rollback_restores_the_previous_champion_and_is_recorded(promoted):
    root, weak, strong = promoted
    result = visionops(root, "models", "rollback", "--reason", "bad in production")
    assert result.returncode == 0, result.stderr
    registry = Registry(load_params(root / "params.yaml"))
    assert str(registry.champion().version) == str(weak["model_version"])
    history = registry.history()
    assert [(e["event"], e["from_version"], e["to_version"]) for e in history] == [
        ("promote", "", str(weak["model_version"])),
        ("promote", str(weak["model_version"]), str(strong["model_version"])),
        ("rollback", str(strong["model_version"]), str(weak["model_version"]))]
    assert history[-1]["reason"] == "bad in production" and history[-1]["actor"]
    assert history[1]["actor"].startswith("prefect flow run")

    back = visionops(root, "models", "promote", str(strong["model_version"]), "--reason",
                     "fixed")
    assert back.returncode == 0, back.stderr
    assert str(registry.champion().version) == str(strong["model_version"])


def test_a_rejected_version_promoted_by_hand_is_exported_too(promoted):
    root, _, _ = promoted
    weak_again = {**BAD_MODEL, "train": {**BAD_MODEL["train"], "seed": 3}}  # not v1 again
    rejected = retrain(params_path=str(write_params(root, weak_again,
                                                    name="params-weak-2.yaml")))
    assert rejected["decision"] == "rejected"
    registry = Registry(load_params(root / "params.yaml"))
    run_id = registry.version(rejected["model_version"]).run_id
    assert not registry.client.list_artifacts(run_id, "export")  # the flow did not export it

    result = visionops(root, "models", "promote", str(rejected["model_version"]), "--reason",
                       "override")

    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout
    assert {a.path for a in registry.client.list_artifacts(run_id, "export")} == {
        "export/model.tflite", "export/saved_model", "export/model.onnx"}
    assert registry.client.get_run(run_id).data.metrics["export_onnx_published"] == 1.0


def test_racing_promotions_leave_exactly_one_champion(promoted):
    root, weak, strong = promoted
    versions = [str(weak["model_version"]), str(strong["model_version"])] * 3
    racers = [subprocess.Popen([str(Path(sys.executable).with_name("visionops")), "models",
                                "promote", version, "--reason", f"race {i}", "--params",
                                str(root / "params.yaml")], cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for i, version in enumerate(versions)]
    assert all(racer.wait(timeout=300) == 0 for racer in racers)

    registry = Registry(load_params(root / "params.yaml"))
    champion = registry.champion()
    champions = [row["version"] for row in registry.listing() if "champion" in row["aliases"]]
    assert champions == [str(champion.version)]
    assert not registry.repair()  # no move left half done
    history = registry.history()[-len(versions):]
    assert history[-1]["to_version"] == str(champion.version)
    for before, after in zip(history, history[1:], strict=False):
        assert after["from_version"] == before["to_version"]  # chained: no lost move
