"""Score registered versions on the current test split (the same split the flow uses),
and batch-score images with the champion (`visionops score`, flows/score.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionops.core.config import Params
from visionops.io.registry import Registry


def current_test_split(params: Params):
    """(test paths, integer labels, class names) of the dataset as it is now, split as
    the flow splits it: without the files validation leaves out of training. Nothing on
    disk changes (a `fix` policy is the flow's)."""
    from visionops.core.split import assign_splits, class_names_of, split_labels
    from visionops.io.validation import collect_facts, validate_facts

    facts = collect_facts(params.data_dir, params.validation.max_side)
    report = validate_facts(params.data_dir, facts, params.validation)
    facts = facts.assign(excluded=facts["path"].map(report.excluded).fillna(""))
    table = assign_splits(facts, params.split)
    class_names = class_names_of(table)
    paths, y = split_labels(table, "test", class_names)
    return paths, y, class_names


def compare_versions(params: Params, versions: list[str]) -> dict:
    from visionops.core.gate import mcnemar_exact
    from visionops.core.metrics import evaluate_model
    from visionops.io.dataset import content_hash
    from visionops.io.models import load_registered_version

    registry = Registry(params)
    names = [str(registry.version(v).version) for v in versions]
    paths, y, class_names = current_test_split(params)
    evaluations = {}
    for version in names:
        loaded = load_registered_version(params, version)
        evaluations[version] = evaluate_model(loaded.model, params.data_dir, paths, y,
                                              class_names, loaded.class_names,
                                              loaded.input_contract)
    b, c, p_value = mcnemar_exact(*(evaluations[v].predictions == y for v in names[:2]))
    return {
        "versions": names, "test_images": len(paths),
        "data_version": content_hash(params.data_dir),
        "metrics": {metric: {v: evaluations[v].metrics[metric] for v in names}
                    for metric in evaluations[names[0]].metrics},
        "mcnemar": {"b": b, "c": c, "p_value": p_value},
    }


# -- batch scoring (`visionops score`, flows/score.py) ---------------------------------------

ROWS_PER_GROUP = 8_192  # rows a Parquet row group holds: what memory holds of the output
PROGRESS_EVERY = 1_000  # images between two progress lines
FACT_COLUMNS = ["path", "inside_root", "format", "width", "height", "decodable",
                "brightness", "error"]


def scoring_experiment(params: Params) -> str:
    """`<mlflow.experiment_name>-scoring`, created the first time (local artifacts for a
    local store, as for the retrain experiment)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = f"{params.mlflow.experiment_name}-scoring"
    mlflow.set_tracking_uri(params.tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    local_store = params.tracking_uri.startswith(("sqlite:", "file:", "/"))
    try:
        return mlflow.create_experiment(
            name, artifact_location=params.artifact_location if local_store else None)
    except MlflowException as exc:  # created meanwhile by another run
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def input_facts(root, files: list[str], max_side: int):
    """What the drift check measures of each file (visionops.core.images.image_facts),
    unlabelled; a file whose real path leaves `root`, or whose header is over `max_side`,
    is not decoded; one that cannot be read (gone since it was listed) says why."""
    import pandas as pd

    from visionops.core.images import image_facts

    def facts(name: str) -> dict:
        try:
            return image_facts(root, name, "", max_side)
        except OSError as exc:
            return {"path": name, "decodable": False, "error": _unreadable(exc)}

    rows = [{key: found.get(key) for key in FACT_COLUMNS} for found in map(facts, files)]
    return pd.DataFrame(rows, columns=FACT_COLUMNS)


def _unreadable(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "gone since it was listed"
    return f"could not be read ({type(exc).__name__}: {exc.strerror or exc})"


def skip_reason(facts: dict) -> str | None:
    """Why a file is not scored (None: it is), from its row of `input_facts`."""
    if str(facts["decodable"]) == "True":
        return None
    if isinstance(facts["error"], str):
        return facts["error"]  # not decodable, or leads outside the folder
    if str(facts["decodable"]) == "False":
        return "not a decodable image"
    return f"{facts['width']:.0f}x{facts['height']:.0f} px, over validation.max_side"


def probability_columns(class_names: list[str]) -> list[str]:
    return [f"probability_{name}" for name in class_names]


class PredictionsFile:
    """One Parquet file of predictions, a row per image: path (file path or s3:// URL),
    label, probability (the top one), probability_<class> per class, model_version,
    model_name. Rows are written in row groups as they come; the file is written under a
    temporary name beside `path` and renamed to it by `close`, so `path` is whole or
    absent."""

    def __init__(self, path, class_names: list[str], model_name: str, model_version: str):
        import secrets

        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.class_names = path, class_names
        self.model = {"model_version": str(model_version), "model_name": model_name}
        self.schema = pa.schema([("path", pa.string()), ("label", pa.string()),
                                 ("probability", pa.float32()),
                                 *((column, pa.float32())
                                   for column in probability_columns(class_names)),
                                 ("model_version", pa.string()), ("model_name", pa.string())])
        path.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        self.writer = pq.ParquetWriter(self.temporary, self.schema)
        self.pending: list[tuple[list[str], np.ndarray]] = []

    def write(self, locations: list[str], probabilities: np.ndarray) -> None:
        self.pending.append((locations, probabilities))
        if sum(len(locations) for locations, _ in self.pending) >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.pending:
            return
        locations = [location for batch, _ in self.pending for location in batch]
        probabilities = np.concatenate([rows for _, rows in self.pending]).astype(np.float32)
        best = probabilities.argmax(axis=1)
        columns = {"path": locations,
                   "label": [self.class_names[i] for i in best],
                   "probability": probabilities[np.arange(len(best)), best],
                   **{column: probabilities[:, i] for i, column in
                      enumerate(probability_columns(self.class_names))},
                   **{key: [value] * len(best) for key, value in self.model.items()}}
        self.writer.write_table(pa.table(columns, schema=self.schema))
        self.pending = []

    def close(self) -> None:
        import os

        self._flush()
        self.writer.close()
        with self.temporary.open("rb") as written:
            os.fsync(written.fileno())  # on disk before it takes the name
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        self.writer.close()
        self.temporary.unlink(missing_ok=True)


def probability_batches(champion, paths: list, skipped: dict[int, str], step: int
                        ) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices into `paths`, the champion's class probabilities for them), a batch at a
    time, through the prediction pipeline of `visionops predict`. A file that cannot be
    decoded now (replaced or deleted since its facts were read) is left out, its reason
    in `skipped`: the `step` files from where decoding failed are predicted file by file,
    then the fast pipeline takes up the rest."""
    from visionops.core.pipeline import UnreadableImage, predict_files

    start = 0
    while start < len(paths):
        try:
            for batch in predict_files(champion.model, paths[start:], champion.input_contract,
                                       batch_size=step):
                yield list(range(start, start + len(batch))), batch
                start += len(batch)
        except UnreadableImage:
            end = min(start + step, len(paths))
            yield from _one_by_one(champion, paths, range(start, end), skipped)
            start = end


def _one_by_one(champion, paths: list, indices: range, skipped: dict[int, str]):
    from visionops.core.pipeline import UnreadableImage, decode_image, model_input, predict_pixels

    size, channels = model_input(champion.model)
    kept, pixels = [], []
    for index in indices:
        try:
            pixels.append(decode_image(paths[index], size, channels))
            kept.append(index)
        except UnreadableImage as exc:
            skipped[index] = ("gone since it was listed" if not Path(paths[index]).exists()
                              else str(exc).removeprefix(f"{paths[index]}: "))
    if kept:
        yield kept, predict_pixels(champion.model, np.stack(pixels), champion.input_contract)


@dataclass
class ScoredImages:
    labels: list[str]          # the predicted label of each image scored, in order
    skipped: dict[int, str]    # index of a file not scored -> why (unreadable at prediction)
    low_confidence: int        # images whose top probability is below the threshold
    review_copies: list[str]   # where the copies sent now are (a path or s3:// URL each)
    already_sent: int          # low-confidence images the review area had been sent before
    review_failed: int         # low-confidence images that could not be copied
    review_problem: str        # why the first of those could not ("" when none failed)
    seconds: float


REVIEW_GIVE_UP = 10  # failed copies in a row after which the review area is not tried again


@dataclass
class ReviewTally:
    """What became of the low-confidence images: copied, sent before, or failed."""
    low_confidence: int = 0
    copies: list[str] = field(default_factory=list)
    already: int = 0
    failed: int = 0
    failed_in_a_row: int = 0
    problem: str = ""

    def copy(self, review, name: str, path: Path, label: str, image_format) -> None:
        self.low_confidence += 1
        if self.failed_in_a_row >= REVIEW_GIVE_UP:
            self.failed += 1
            return
        try:
            where = review.add(name, path.read_bytes(), label, image_format)
        except Exception as exc:  # noqa: BLE001 - the area refusing: the predictions stay
            self.failed, self.failed_in_a_row = self.failed + 1, self.failed_in_a_row + 1
            self.problem = self.problem or f"{name}: {type(exc).__name__}: {exc}"
            return
        self.failed_in_a_row = 0
        if where is None:
            self.already += 1
        else:
            self.copies.append(where)


def score_images(champion, root, files: list[str], images: list, formats: list,
                 predictions: PredictionsFile, review, threshold: float, log,
                 step: int | None = None) -> ScoredImages:
    """Predict `files` (relative to `root`; `images` are their SourceImages) into
    `predictions`, `step` at a time (default: `batch_size`); copy each one whose top
    probability is below `threshold` into the `review` area under its predicted label.
    A file that cannot be decoded now is skipped, a copy that fails is counted: neither
    stops the batch. `log(done, total, seconds)` is called every PROGRESS_EVERY images."""
    import time

    from visionops.core.predict import predict_step

    started, done, labels, skipped = time.monotonic(), 0, [], {}
    tally = ReviewTally()
    paths = [root / name for name in files]
    for indices, batch in probability_batches(champion, paths, skipped, step or
                                              predict_step(champion.model)):
        predictions.write([images[index].location for index in indices], batch)
        for index, row in zip(indices, batch, strict=True):
            best = int(np.argmax(row))
            labels.append(champion.class_names[best])
            if row[best] < threshold:
                tally.copy(review, images[index].name, paths[index], labels[-1],
                          formats[index])
        if (done + len(batch)) // PROGRESS_EVERY > done // PROGRESS_EVERY:
            log(done + len(batch), len(files), time.monotonic() - started)
        done += len(batch)
    return ScoredImages(labels, skipped, tally.low_confidence, tally.copies, tally.already,
                        tally.failed, tally.problem, time.monotonic() - started)


def champion_facts(champion, params: Params, out_dir):
    """(the image facts table the champion's run recorded as validation/image_facts.csv,
    "") or (None, why it could not be read)."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from visionops.core.images import FACT_DTYPES
    from visionops.io.transient import is_transient_error

    if not champion.run_id:
        return None, f"champion v{champion.version} names no run"
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=champion.run_id, artifact_path="validation/image_facts.csv",
            dst_path=str(out_dir / "champion"), tracking_uri=params.tracking_uri)
        return pd.read_csv(path, dtype=FACT_DTYPES), ""
    except (MlflowException, OSError, ValueError) as exc:
        if is_transient_error(exc):
            raise  # the store is away for a moment: the task tries again
        return None, (f"the image facts of champion v{champion.version} could not be read "
                      f"({type(exc).__name__}: {exc})")
