"""The feedback loop end to end, with real MLflow, DVC and Prefect: images the champion is
unsure of are scored and copied to the review area under their predicted label; a
reviewer moves each into the landing area under its true label; scoring the same images
again sends none of them back; the next retrain ingests them into data/<label>/ (a new
dataset version) and trains on them."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from mlflow import MlflowClient
from projects import digits, make_project, write_params

from visionops.core.config import Params, load_params


def register_champion(params: Params, data: Path, epochs: int = 3) -> str:
    """A small model trained in-process on `data`, registered and promoted with what a
    retrain leaves: class_names, input_contract and data_version tags, and the image facts
    of its data as its run's validation/image_facts.csv. Its version."""
    import keras
    import mlflow

    from visionops.core.images import facts_table, iter_image_files
    from visionops.core.models import seed_cnn
    from visionops.core.pipeline import INPUT_CONTRACT_TAG, PIXELS, load_pixels
    from visionops.io.dataset import content_hash
    from visionops.io.models import register_model
    from visionops.io.registry import Registry
    from visionops.io.tracking import use_experiment

    files = list(iter_image_files(data))
    class_names = sorted({label for _, label in files})
    pixels = load_pixels([data / path for path, _ in files], params.data.image_size,
                         params.data.channels).astype(np.float32)
    labels = np.array([class_names.index(label) for _, label in files])
    keras.utils.set_random_seed(7)
    model = seed_cnn(pixels.shape[1:], len(class_names))
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy")
    model.fit(pixels, labels, epochs=epochs, batch_size=16, verbose=0)
    with mlflow.start_run(experiment_id=use_experiment(params)), \
            tempfile.TemporaryDirectory() as scratch:
        facts = Path(scratch) / "image_facts.csv"
        facts_table(data, files).to_csv(facts, index=False)
        mlflow.log_artifact(str(facts), "validation")
        registered = register_model(model, params.registry.model_name, pixels[:2], {
            "class_names": json.dumps(class_names), INPUT_CONTRACT_TAG: PIXELS,
            "data_version": content_hash(data)})
    Registry(params).promote(registered.version, "registered by the test")
    return str(registered.version)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reviewed_low_confidence_images_are_ingested_and_learned_by_the_next_retrain(
        tmp_path, prefect_server):
    from flows.retrain import retrain
    from flows.score import score
    from visionops.io.dataset import content_hash

    root = make_project(tmp_path / "project", labels=range(3), per_class=10)
    landing, review = tmp_path / "landing", tmp_path / "review"
    landing.mkdir()
    params_path = write_params(root, {
        "train": {"epochs": 2}, "export": {"formats": []},
        "ingest": {"landing": str(landing)},
        # every image is below it: all are sent for review
        "feedback": {"confidence_threshold": 1.0, "review_dir": str(review)}})
    params = load_params(params_path)
    first = register_champion(params, root / "data")
    incoming = tmp_path / "incoming"  # new digits; their true label is their folder
    for label in range(3):
        digits(incoming, label, first=10, count=3)
    true_label = {path.stem: path.parent.name for path in incoming.rglob("*.png")}

    scored = score(str(incoming), str(params_path))

    assert scored["model_version"] == first
    predictions = pq.read_table(scored["output"]).to_pandas()
    predicted = dict(zip(predictions["path"].map(lambda p: Path(p).stem), predictions["label"],
                         strict=True))
    copies = sorted(review.rglob("*.png"))
    assert scored["sent_for_review"] == len(copies) == len(true_label) == 9
    # each copy: review/<predicted label>/<file>-<content hash>.png
    for copy in copies:
        assert copy.parent.name == predicted[copy.stem.rsplit("-", 1)[0]]

    # The reviewer: each file out of review/<predicted>/ into landing/<true label>/.
    moved = {}
    for copy in copies:
        label = true_label[copy.stem.rsplit("-", 1)[0]]
        (landing / label).mkdir(exist_ok=True)
        moved[_sha256(copy)] = label
        shutil.move(copy, landing / label / copy.name)
    # The next morning's run scores the same images: what was reviewed does not come back.
    again = score(str(incoming), str(params_path))
    assert again["sent_for_review"] == 0 and again["already_sent"] == 9
    assert not list(review.rglob("*.png"))
    before = content_hash(root / "data")

    summary = retrain(params_path=str(params_path))

    after = content_hash(root / "data")
    assert summary["data_version"] == after != before
    in_data = {_sha256(path): path.parent.name for path in (root / "data").rglob("*.png")}
    assert {sha: in_data.get(sha) for sha in moved} == moved, "each under its true label"
    assert summary["epochs_run"] > 0 and summary["model_version"] not in (None, first)
    client = MlflowClient(params.tracking_uri)
    run = client.get_run(summary["run_id"])
    assert run.data.tags["data_version"] == after
    assert client.get_model_version(params.registry.model_name, summary["model_version"]
                                    ).tags["data_version"] == after
    split = pd.read_csv(client.download_artifacts(summary["run_id"], "data/split.csv",
                                                  str(tmp_path)))
    assert len(split) == 30 + 9, "trained on the dataset with the reviewed images"
    ingested = json.loads(Path(client.download_artifacts(
        summary["run_id"], "data/ingest.json", str(tmp_path))).read_text())
    assert len(ingested["accepted"]) == 9
