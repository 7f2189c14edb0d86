"""Batch scoring on the team stack: images under an S3 prefix of the landing bucket,
scored by `visionops score s3://...` with the pipeline writer's settings only, its run in
the authenticated MLflow server, low-confidence copies in an S3 review area. The champion
is a model of its own (not the stack's `tiny-digits`, which test_stack.py trains first)."""

from __future__ import annotations

import json
import os
import uuid

import pyarrow.parquet as pq
import requests
from mlflow import MlflowClient
from projects import visionops, write_params
from test_feedback_loop import register_champion

from visionops.core.config import load_params
from visionops.core.demo import write_digits
from visionops.ops.stack import BUCKETS

MODEL = "tiny-digits-scoring"


def test_score_an_s3_prefix_with_the_writers_settings(team_stack, tmp_path, monkeypatch):
    import mlflow

    writer = team_stack.client_env()
    prefix = f"scoring-test/{uuid.uuid4().hex[:8]}"
    review = f"s3://{BUCKETS['landing']}/{prefix}/review"
    params_path = write_params(tmp_path, {"registry": {"model_name": MODEL},
                                          "feedback": {"review_dir": review,
                                                       "confidence_threshold": 1.0}})
    for key, value in writer.items():  # the champion is registered as the writer
        if not key.startswith("PREFECT_"):
            monkeypatch.setenv(key, value)
    write_digits(tmp_path / "data", per_class=10, labels=range(3))
    params = load_params(params_path)
    previous_uri = mlflow.get_tracking_uri()
    try:
        version = register_champion(params, tmp_path / "data", epochs=1)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    s3 = team_stack.object_store("writer").client()
    uploaded = []
    for image in sorted((tmp_path / "data").rglob("*.png"))[::5]:  # 6 images, 2 per class
        key = f"{prefix}/images/{image.parent.name}/{image.name}"
        s3.upload_file(str(image), BUCKETS["landing"], key)
        uploaded.append(f"s3://{BUCKETS['landing']}/{key}")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "VISIONOPS_"))}

    done = visionops("score", f"s3://{BUCKETS['landing']}/{prefix}/images", "--params",
                     str(params_path), "--output", str(tmp_path / "scored.parquet"), "--json",
                     env={**base, **writer})

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    table = pq.read_table(tmp_path / "scored.parquet").to_pandas()
    assert table["path"].tolist() == uploaded
    assert set(table["label"]) <= {"0", "1", "2"} and set(table["model_version"]) == {version}
    assert summary["images"] == 6 and summary["drift_status"] != "skipped"
    client = MlflowClient(team_stack.mlflow_url)
    run = client.get_run(summary["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "tiny-scoring"
    assert run.data.tags["model_uri"] == f"models:/{MODEL}/{version}"
    assert run.data.tags["source"] == f"s3://{BUCKETS['landing']}/{prefix}/images"
    assert run.data.metrics["images"] == 6 and "drift_width_distribution" in run.data.metrics
    assert "predictions/scored.parquet" in {
        f.path for f in client.list_artifacts(summary["run_id"], "predictions")}
    copies = [item["Key"] for item in s3.list_objects_v2(
        Bucket=BUCKETS["landing"], Prefix=f"{prefix}/review/").get("Contents", [])
        if "/.visionops/" not in item["Key"]]  # the area's own markers of what it sent
    assert summary["sent_for_review"] == len(copies) == 6
    predicted = {row.path.rsplit("/", 1)[1].removesuffix(".png"): row.label
                 for row in table.itertuples()}
    for key in copies:  # <prefix>/review/<predicted label>/<name>-<hash>.png
        label, name = key.split("/")[-2:]
        assert predicted[name.rsplit("-", 1)[0]] == label
    seen = requests.get(f"{team_stack.mlflow_url}/api/2.0/mlflow/runs/get",  # a person's
                        params={"run_id": summary["run_id"]},  # (read-only) account sees it
                        auth=team_stack.user("reviewer"), timeout=30)
    assert seen.ok and seen.json()["run"]["data"]
