"""Batch scoring (`visionops score`, flows/score.py) with the champion of the tiny trained
project: real Prefect flow, real SQLite MLflow store, real files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from projects import visionops, write_params

from flows.score import score

MODEL = "tiny-digits"


@pytest.fixture(scope="module")
def scoring(trained_project, tmp_path_factory):
    """(project, its params for scoring, a folder of 5 images per class to score)."""
    root, _ = trained_project
    work = tmp_path_factory.mktemp("score")
    params = write_params(root, {"feedback": {"review_dir": str(work / "review")},
                                 "scoring": {"output_dir": str(work / "predictions")}},
                          name="params-score.yaml")
    images = work / "images"
    for label in sorted((root / "data").iterdir()):
        (images / label.name).mkdir(parents=True)
        for image in sorted(label.glob("*.png"))[:5]:
            shutil.copy(image, images / label.name / image.name)
    return root, params, images


def _client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _with_this_prefect_server() -> dict:
    from prefect.settings import get_current_settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_API_URL": get_current_settings().api.url}


def test_score_command_writes_the_labels_predict_gives_and_a_run_of_the_version(scoring):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    root, params, images = scoring
    output = images.parent / "scored.parquet"

    done = visionops("score", str(images), "--params", str(params), "--output", str(output),
                     "--json", env=_with_this_prefect_server())
    predicted = visionops("predict", str(images), "--params", str(params), "--json")

    assert done.returncode == 0, done.stderr[-3000:]
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    expected = json.loads(predicted.stdout)
    table = pq.read_table(output).to_pandas()
    class_names = json.loads(_client(root).get_model_version(
        MODEL, summary["model_version"]).tags["class_names"])
    assert list(table.columns) == ["path", "label", "probability",
                                   *(f"probability_{name}" for name in class_names),
                                   "model_version", "model_name"]
    assert dict(zip(table["path"], table["label"], strict=True)) == {
        row["path"]: row["label"] for row in expected["predictions"]}
    assert len(table) == summary["images"] == 20 and summary["output"] == str(output)
    assert table["probability"].tolist() == pytest.approx(
        [row["probability"] for row in expected["predictions"]], abs=1e-6)
    per_class = table[[f"probability_{name}" for name in class_names]].to_numpy()
    assert np.allclose(per_class.sum(axis=1), 1, atol=1e-4)
    assert set(table["model_version"]) == {summary["model_version"]} == {
        expected["champion_version"]}
    assert set(table["model_name"]) == {MODEL}

    client = _client(root)
    run = client.get_run(summary["run_id"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert client.get_experiment(run.info.experiment_id).name == "tiny-scoring"
    assert run.data.tags["model_version"] == str(champion.version) == summary["model_version"]
    assert run.data.tags["model_uri"] == f"models:/{MODEL}/{champion.version}"
    assert run.data.tags["data_version"] == champion.tags["data_version"]
    assert run.data.tags["source"] == str(images)
    assert run.data.metrics["images"] == 20 and run.data.metrics["images_per_second"] > 0
    assert sum(run.data.metrics[f"predicted_share_{name}"] for name in class_names) == \
        pytest.approx(1)
    assert "drift_brightness_distribution" in run.data.metrics
    assert "drift_predicted_class_distribution" in run.data.metrics
    artifacts = {f.path for folder in ("drift", "predictions")
                 for f in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"drift/drift.json", "drift/drift.png", "predictions/scored.parquet",
                         "predictions/predictions_summary.json"}
    # the default threshold (0.6) decides what was sent for review, and nothing else
    review = Path(summary["review_dir"])
    copies = sorted(review.rglob("*.png")) if review.exists() else []
    assert summary["sent_for_review"] == len(copies) == int((table["probability"] < 0.6).sum())
    with get_client(sync_client=True) as prefect:
        markdown = [a.data for a in prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["scoring-summary"])))]
    assert any(str(output) in text and f"v{champion.version}" in text for text in markdown)


def test_shifted_images_get_a_drift_warning_and_are_still_scored(scoring, tmp_path):
    from PIL import Image, ImageOps

    root, _, images = scoring
    shifted = tmp_path / "inverted"
    for image in images.rglob("*.png"):
        target = shifted / image.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(image)).save(target)
    (shifted / "0" / "broken.png").write_bytes(b"\x89PNG not really")
    params = write_params(root, {"feedback": {"review_dir": str(tmp_path / "review")}},
                          name="params-shifted.yaml")

    summary = score(str(shifted), str(params), str(tmp_path / "out.parquet"))

    assert summary["drift_status"] == "fail"
    assert summary["images"] == 20 and summary["skipped"] == 1
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 20
    client = _client(root)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert "brightness distribution: 1.000 (fail)" in run.data.tags["drift_warning"]
    assert run.data.tags["drift_status"] == "fail"
    details = json.loads(Path(client.download_artifacts(
        summary["run_id"], "predictions/predictions_summary.json", str(tmp_path))).read_text())
    (skipped,) = details["skipped_images"]
    assert skipped["path"] == str(shifted / "0" / "broken.png")
    assert "UnidentifiedImageError" in skipped["reason"]


def test_images_below_the_confidence_threshold_and_only_they_go_to_review(scoring, tmp_path):
    root, _, images = scoring
    unsure = write_params(root, {"feedback": {"review_dir": str(tmp_path / "none"),
                                              "confidence_threshold": 0.0}},
                         name="params-unsure.yaml")
    first = score(str(images), str(unsure), str(tmp_path / "first.parquet"))
    table = pq.read_table(first["output"]).to_pandas()
    threshold = float(table["probability"].median())
    below = table[table["probability"] < threshold]
    write_params(root, {"feedback": {"review_dir": str(tmp_path / "review"),
                                     "confidence_threshold": threshold}},
                 name="params-unsure.yaml")

    summary = score(str(images), str(unsure), str(tmp_path / "second.parquet"))

    assert first["sent_for_review"] == 0 and not (tmp_path / "none").exists()
    copies = sorted((tmp_path / "review").rglob("*.png"))
    assert 0 < summary["sent_for_review"] == len(copies) == len(below)
    expected = sorted((label, Path(path).stem) for path, label in zip(
        below["path"], below["label"], strict=True))
    assert sorted((copy.parent.name, copy.stem.rsplit("-", 1)[0]) for copy in copies) == expected
    run = _client(root).get_run(summary["run_id"])
    assert run.data.metrics["low_confidence_share"] == pytest.approx(len(below) / len(table))


def test_a_missing_or_empty_folder_is_a_clear_error_before_any_run(scoring, tmp_path):
    root, params, _ = scoring
    client = _client(root)
    experiment = client.get_experiment_by_name("tiny-scoring")
    runs_before = len(client.search_runs([experiment.experiment_id]))
    (tmp_path / "empty" / "0").mkdir(parents=True)
    (tmp_path / "empty" / "0" / "notes.txt").write_text("not an image")

    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}: no such folder"):
        score(str(tmp_path / "missing"), str(params), str(tmp_path / "out.parquet"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no images"):
        score(str(tmp_path / "empty"), str(params), str(tmp_path / "out.parquet"))

    assert len(client.search_runs([experiment.experiment_id])) == runs_before
    assert not (tmp_path / "out.parquet").exists()
