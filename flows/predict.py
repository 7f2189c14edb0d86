"""The predict flow: label every image in a folder with the champion into a CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from visionops.core.config import DEFAULT_PARAMS, load_params
from visionops.core.predict import image_paths, predict_paths
from visionops.io.models import load_champion


@task(name="Label images with the champion", timeout_seconds=6 * 60 * 60)
def label_folder(params_path: str, folder: str, output_csv: str) -> dict:
    champion = load_champion(load_params(params_path))
    paths = image_paths([Path(folder)])
    output = Path(output_csv)
    output.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "probability"])
        writer.writeheader()
        for row in predict_paths(champion, paths):
            writer.writerow(row)
            counts[row["label"]] = counts.get(row["label"], 0) + 1
    return {"images": len(paths), "csv": str(output), "champion_version": champion.version,
            "labels": counts}


@flow(name="predict", log_prints=True, timeout_seconds=6 * 60 * 60)
def predict(folder: str, output_csv: str = "predictions.csv",
            params_path: str = DEFAULT_PARAMS) -> dict:
    summary = label_folder(params_path, folder, output_csv)
    create_table_artifact(
        key="predictions", description=f"Labels given by champion v{summary['champion_version']}",
        table=[{"label": k, "images": v} for k, v in sorted(summary["labels"].items())])
    get_run_logger().info("%s images labelled into %s", summary["images"], summary["csv"])
    return summary
