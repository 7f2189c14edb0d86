"""The pipeline's stages as files in, files out, for `dvc repro` (see dvc.yaml).

Each stage calls the same functions as the Prefect flow's tasks; only the
registry steps (gate, register, promote) are the flow's alone, since they change
the MLflow registry rather than produce files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from visionops.core.config import Params

REPORTS = Path("reports")


def _out(params: Params, *parts: str) -> Path:
    """A file under reports/, its folder created."""
    path = params.root.joinpath(REPORTS, *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _folder(params: Params, name: str) -> Path:
    path = params.root / REPORTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def validate(params: Params) -> bool:
    from visionops.io.validation import validate_dataset, write_report

    report, facts = validate_dataset(params.data_dir, params.validation, params.data_docs_dir)
    write_report(report, facts, _folder(params, "validation"))
    print(report.describe())
    return report.success


def split(params: Params) -> None:
    from visionops.core.images import FACT_DTYPES
    from visionops.core.split import assign_splits

    facts = pd.read_csv(_out(params, "validation", "image_facts.csv"), dtype=FACT_DTYPES)
    assign_splits(facts, params.split).to_csv(_out(params, "split.csv"), index=False)


def _prepared(params: Params):
    from visionops.core.split import prepare_data

    table = pd.read_csv(_out(params, "split.csv"), dtype={"label": str})
    return prepare_data(params.data_dir, table, params.data)


def train(params: Params) -> None:
    from visionops.core.training import train_model

    result = train_model(_prepared(params), params.training, params.augment,
                         _folder(params, "train"), shuffle_buffer=params.data.shuffle_buffer)
    result.model.save(_out(params, "model.keras"))
    _out(params, "history.json").write_text(json.dumps(result.history, indent=2))


def evaluate(params: Params) -> None:
    from visionops.core.metrics import evaluate_model, plot_confusion_matrix
    from visionops.core.model_safety import load_keras_file

    # checked first: reports/model.keras may come from the DVC remote (`dvc pull`)
    model = load_keras_file(_out(params, "model.keras"))
    prepared = _prepared(params)
    evaluation = evaluate_model(model, params.data_dir, prepared.test.paths, prepared.test.y,
                                prepared.class_names)
    _out(params, "metrics.json").write_text(json.dumps(evaluation.metrics, indent=2))
    plot_confusion_matrix(evaluation.confusion, prepared.class_names,
                          _out(params, "confusion_matrix.png"))


STAGES = {"validate": validate, "split": split, "train": train, "evaluate": evaluate}
