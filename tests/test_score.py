"""Batch scoring (`visionops score`, flows/score.py) with the champion of the tiny trained
project: real Prefect flow, real SQLite MLflow store, real files."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from projects import visionops, write_params

from flows.score import _default_output, score
from visionops.core.config import load_params

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


def test_a_file_broken_or_deleted_after_its_facts_is_skipped_and_the_rest_scored(scoring,
                                                                                 tmp_path):
    from visionops.io.feedback import ReviewArea
    from visionops.io.models import load_champion
    from visionops.io.sources import open_source
    from visionops.jobs.scoring import PredictionsFile, score_images

    _, params, images = scoring
    champion = load_champion(load_params(params))
    source = open_source(shutil.copytree(images, tmp_path / "images"))
    listed = source.list()

    def run(images: list, output: Path, step: int | None = None):
        predictions = PredictionsFile(output, champion.class_names, MODEL, champion.version)
        with source.stage(images) as staged:
            result = score_images(champion, staged.root, staged.files, images,
                                  [None] * len(images), predictions,
                                  ReviewArea(str(tmp_path / "review")), 0.0,
                                  lambda *_: None, step=step)
        predictions.close()
        return result, pq.read_table(output).to_pandas()

    broken, deleted = listed[5], listed[13]
    healthy = [image for image in listed if image not in (broken, deleted)]
    expected_result, expected = run(healthy, tmp_path / "expected.parquet")
    Path(broken.location).write_bytes(b"\x89PNG\r\n\x1a\n replaced since its facts were read")
    Path(deleted.location).unlink()

    result, table = run(listed, tmp_path / "scored.parquet", step=4)  # 5 batches

    assert result.skipped.keys() == {5, 13}
    assert result.skipped[5].startswith("not a readable image (")
    assert result.skipped[13] == "gone since it was listed"
    assert table["path"].tolist() == expected["path"].tolist() == [
        image.location for image in healthy]
    assert result.labels == expected_result.labels == table["label"].tolist()
    columns = [f"probability_{name}" for name in champion.class_names]
    assert np.allclose(table[columns], expected[columns], atol=1e-5)


def test_the_next_run_reports_a_killed_run_and_removes_what_it_left(scoring, tmp_path):
    """...and a review area refusing every copy costs the copies, not the predictions."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from visionops.jobs.scoring import scoring_experiment

    root, _, images = scoring
    (tmp_path / "review").write_text("a file where the review folder should be")
    params_path = write_params(tmp_path, {
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment_name": "tiny",
                   "artifact_root": str(root / "mlartifacts")},
        "feedback": {"review_dir": str(tmp_path / "review"), "confidence_threshold": 1.0}})
    killed = f"killed-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as prefect:
        prefect.create_flow_run(score, name=killed, parameters={"params_path": str(params_path)},
                                state=Crashed(message="its process is gone (SIGKILL)"))
    client = _client(root)
    killed_run = client.create_run(scoring_experiment(load_params(params_path)),
                                   run_name=f"score-{killed}")
    out = tmp_path / "out"
    out.mkdir()
    stale, fresh = out / ".a.parquet.0123abcd.tmp", out / ".b.parquet.89abcdef.tmp"
    stale.write_bytes(b"PAR1")
    fresh.write_bytes(b"PAR1")  # a run writing now
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    staging = Path(tempfile.mkdtemp(prefix="visionops-score-"))
    (staging / "00000000.png").write_bytes(b"staged")
    os.utime(staging, (time.time() - 2 * 86400,) * 2)

    summary = score(str(images), str(params_path), str(out / "scored.parquet"))

    report = (tmp_path / "reports" / "failures" / f"{killed}.md").read_text()
    assert report.startswith(f"# score run {killed} crashed") and "SIGKILL" in report
    assert client.get_run(killed_run.info.run_id).info.status == "KILLED"
    assert not stale.exists() and fresh.exists() and not staging.exists()
    table = pq.read_table(out / "scored.parquet").to_pandas()
    unsure = int((table["probability"] < 1.0).sum())
    assert len(table) == summary["images"] == 20
    assert 0 < unsure == summary["review_failed"] and summary["sent_for_review"] == 0
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["review_failed"] == unsure
    warning = run.data.tags["review_warning"]
    assert warning.startswith(f"{unsure} of {unsure} low-confidence images could not be "
                              f"copied to {tmp_path / 'review'}; the first: ")
    assert "NotADirectoryError" in warning or "FileExistsError" in warning


def test_a_failing_run_leaves_a_report_naming_the_fix_and_no_credential(prefect_server,
                                                                         tmp_path):
    params_path = write_params(tmp_path)  # scoring.source unset: the scheduled run's mistake

    with pytest.raises(ValueError, match="set scoring.source in params.yaml"):
        score(params_path=str(params_path))
    with pytest.raises(ValueError, match="credentials come from the environment"):
        score("s3://AKIAKEY:sekrit@bucket/images", str(params_path))

    reports = [path.read_text() for path in (tmp_path / "reports" / "failures").glob("*.md")]
    assert len(reports) == 2 and all(text.startswith("# score run ") for text in reports)
    assert all("**Step:** the flow itself" in text for text in reports)
    assert any("or set scoring.source in params.yaml" in text for text in reports)
    assert not any("sekrit" in text for text in reports)


def test_two_runs_in_one_second_write_two_files(tmp_path):
    params = load_params(write_params(tmp_path))
    first, second = _default_output(params, "3"), _default_output(params, "3")
    assert first != second and first.parent == second.parent == params.scoring_output_dir
    assert first.name.endswith(".parquet") and "-v3-" in first.name
