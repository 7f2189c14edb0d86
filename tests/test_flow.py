"""End-to-end: the retrain flow on a tiny project, with real MLflow, DVC and Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from projects import write_params

from flows.retrain import retrain
from visionops.io.validation import DataValidationError
from visionops.ops import processes


def _client(root) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_first_run_promotes_a_champion_with_lineage(trained_project):
    root, summary = trained_project
    client = _client(root)

    assert summary["decision"] == "first_champion"
    champion = client.get_model_version_by_alias("tiny-digits", "champion")
    assert str(champion.version) == str(summary["model_version"])
    assert str(summary["champion_version"]) == str(champion.version)
    assert "champion" in champion.aliases
    assert champion.tags["decision"] == "first_champion"

    dvc_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    run = client.get_run(summary["run_id"])
    assert run.data.tags["data_version"] == dvc_md5 == summary["data_version"]
    assert champion.tags["data_version"] == dvc_md5
    assert run.data.tags["git_commit"]
    assert any((root / "dvc-storage").rglob("*")), "the data version was pushed to the remote"

    assert run.data.params["train.epochs"] == "12"
    assert run.data.params["gate.min_improvement"] == "0.01"
    for metric in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert run.data.metrics[f"test_{metric}"] == pytest.approx(summary["metrics"][metric])
    assert summary["metrics"]["accuracy"] >= 0.5
    epochs = client.get_metric_history(summary["run_id"], "val_loss")
    assert [m.step for m in epochs] == list(range(summary["epochs_run"]))

    artifacts = {f.path for d in ("validation", "evaluation", "training", "gate", "data",
                                  "validation/data_docs")
                 for f in client.list_artifacts(summary["run_id"], d)}
    assert {"validation/validation.json", "validation/image_facts.csv",
            "evaluation/test_confusion_matrix.png", "evaluation/test_classification_report.json",
            "training/learning_curve_loss.png", "training/learning_curve_accuracy.png",
            "gate/decision.json", "data/split.csv",
            "validation/data_docs/index.html"} <= artifacts
    assert client.list_artifacts(summary["run_id"], "tensorboard")


def test_nothing_changed_means_nothing_trained(trained_project):
    root, first = trained_project
    client = _client(root)
    versions_before = len(client.search_model_versions("name = 'tiny-digits'"))

    summary = retrain(params_path=str(root / "params.yaml"))

    assert summary["decision"] == "unchanged"
    assert "nothing to do" in summary["reason"]
    assert summary["model_version"] is None and summary["epochs_run"] == 0
    assert str(summary["champion_version"]) == str(first["champion_version"])
    assert summary["metrics"]["accuracy"] == pytest.approx(first["metrics"]["accuracy"],
                                                           abs=1e-4)
    assert len(client.search_model_versions("name = 'tiny-digits'")) == versions_before
    assert client.get_run(summary["run_id"]).data.tags["decision"] == "unchanged"


def test_flow_run_ends_with_the_decision_table_in_prefect(trained_project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _, summary = trained_project
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-decision"])))
    tables = [a.data for a in artifacts if summary["data_version"] in a.data]
    assert tables, "no retrain-decision artifact for this data version"
    assert "`first_champion`" in tables[0] and "| f1_macro |" in tables[0]


def test_registered_model_serves_with_its_signature(trained_project):
    root, summary = trained_project
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/tiny-digits@champion")
    assert model.metadata.get_input_schema() is not None
    import numpy as np

    probabilities = model.predict(np.zeros((3, 28, 28, 1), dtype=np.float32))
    assert np.asarray(probabilities).shape == (3, 4)


def test_worse_challenger_is_rejected_and_champion_kept(trained_project):
    root, first = trained_project
    worse = write_params(root, {"train": {"epochs": 1, "learning_rate": 1e-5},
                                "gate": {"min_accuracy": 0.0, "min_f1_macro": 0.0,
                                         "min_class_recall": 0.0}},
                         name="params-worse.yaml")

    summary = retrain(params_path=str(worse))

    assert summary["decision"] == "rejected"
    assert "below min_improvement" in summary["reason"] and "champion kept" in summary["reason"]
    assert str(summary["champion_version"]) == str(first["champion_version"])
    client = _client(root)
    assert str(client.get_model_version_by_alias("tiny-digits", "champion").version) == str(
        first["model_version"])
    rejected = client.get_model_version("tiny-digits", str(summary["model_version"]))
    assert rejected.tags["decision"] == "rejected"
    assert "champion" not in rejected.aliases
    # The champion was re-scored on the same test split, so it scores what it scored first.
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["champion_test_accuracy"] == pytest.approx(
        first["metrics"]["accuracy"])
    assert run.data.tags["champion_version"] == str(first["model_version"])
    assert run.data.tags["drift_status"] == "ok"  # same data as the champion's
    assert {f.path for f in client.list_artifacts(summary["run_id"], "drift")} == {
        "drift/drift.json", "drift/drift.png"}


def test_bad_image_stops_the_flow_before_training(trained_project):
    root, first = trained_project
    dvc_before = (root / "data.dvc").read_text()
    bad = root / "data" / "1" / "broken.png"
    bad.write_bytes((root / "data" / "1").glob("*.png").__next__().read_bytes()[:40])
    try:
        with pytest.raises(DataValidationError, match="1/broken.png"):
            retrain(params_path=str(root / "params.yaml"))
    finally:
        bad.unlink()

    assert (root / "data.dvc").read_text() == dvc_before
    (summary,) = (root / "reports" / "failures").glob("*.md")
    assert "**Step:** Validate images" in summary.read_text()
    assert "1/broken.png" in summary.read_text()
    client = _client(root)
    assert str(client.get_model_version_by_alias("tiny-digits", "champion").version) == str(
        first["champion_version"])
    failed = client.search_runs([first and client.get_run(first["run_id"]).info.experiment_id],
                                "tags.decision = 'data_rejected'")
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    report = json.loads((root / "mlartifacts").joinpath(
        failed[0].info.run_id, "artifacts", "validation", "validation.json").read_text())
    assert report["success"] is False


def test_drifted_data_stops_the_flow_before_training(trained_project, tmp_path):
    from PIL import Image, ImageOps

    from visionops.core.drift import DataDriftError

    root, first = trained_project
    inverted = tmp_path / "inverted"
    for image in (root / "data").rglob("*.png"):
        target = inverted / image.relative_to(root / "data")
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(image)).save(target)

    with pytest.raises(DataDriftError, match=r"brightness distribution: 1.000 \(fail\)"):
        retrain(params_path=str(root / "params.yaml"), data_dir=str(inverted))

    client = _client(root)
    assert str(client.get_model_version_by_alias("tiny-digits", "champion").version) == str(
        first["champion_version"])
    experiment = client.get_run(first["run_id"]).info.experiment_id
    (drifted,) = client.search_runs([experiment], "tags.decision = 'data_drift'")
    assert drifted.info.status == "FAILED"
    assert "drift/drift.json" in {f.path for f in client.list_artifacts(drifted.info.run_id,
                                                                         "drift")}


def test_landing_area_in_params_is_ingested_at_the_head_of_the_flow(trained_project, tmp_path):
    from visionops.core.demo import write_digits

    root, _ = trained_project
    landing = tmp_path / "landing"
    write_digits(landing, per_class=28, labels=range(4))
    for label in landing.iterdir():
        for old in sorted(label.iterdir())[:25]:
            old.unlink()
    params = write_params(root, {"ingest": {"landing": str(landing)}}, name="params-ingest.yaml")
    before = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]

    summary = retrain(params_path=str(params))

    assert summary["data_version"] != before
    assert summary["data_version"] == yaml.safe_load((root / "data.dvc").read_text())["outs"][0][
        "md5"]
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=summary["run_id"], artifact_path="data/ingest.json", dst_path=str(tmp_path),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    ingested = json.loads(Path(downloaded).read_text())
    assert len(ingested["accepted"]) == 12


def test_a_failed_run_posts_its_summary_to_the_webhook(tmp_path, prefect_server):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from projects import make_project

    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = make_project(tmp_path / "project", per_class=3)  # below min_images_per_class
        params = write_params(root, {"notify": {
            "webhook_url": f"http://127.0.0.1:{server.server_port}/hook"}})
        with pytest.raises(DataValidationError):
            retrain(params_path=str(params))
    finally:
        server.shutdown()

    (summary,) = received
    assert summary["flow"] == "retrain" and summary["failed_step"] == "Validate images"
    assert "fewer than 5" in summary["reason"]


def test_a_run_killed_in_training_resumes_from_its_last_epoch(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from projects import make_project

    root = make_project(tmp_path / "project")
    params = write_params(root, {"train": {"epochs": 40, "early_stopping_patience": 40}})
    command = [str(Path(sys.executable).with_name("visionops")), "retrain", "--json",
               "--params", str(params)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in killed.stdout:
        if line.startswith("Epoch 6/40"):
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    processes.stop(killed.pid)  # its group, should anything of it be left running
    checkpoints = root / ".visionops" / "checkpoints"
    assert any(checkpoints.rglob("*")), "the killed run left its last epoch behind"
    assert not (root / "mlflow.db").exists() or not _client(root).search_model_versions(
        "name = 'tiny-digits'"), "no model was registered by the killed run"

    resumed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                             timeout=600)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert 30 <= summary["epochs_run"] <= 36, "resumed after the epochs already done"
    assert "Epoch 1/40" not in resumed.stdout
    assert not any(checkpoints.rglob("*.weights.h5")) and not any(
        p.is_file() and p.suffix != ".lock" for p in checkpoints.rglob("*")), \
        "the backup is removed after success (its lineage's lock file stays)"
    assert len(_client(root).search_model_versions("name = 'tiny-digits'")) == 1
