"""A tiny project folder of its own for flow and CLI tests: params.yaml, a DVC
repository with a local remote, and (once a flow ran) a SQLite MLflow store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from visionops.core.demo import write_digits

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "data": {"path": "data", "image_size": 28, "channels": 1},
    "validation": {"min_images_per_class": 5},
    "train": {"epochs": 12, "batch_size": 16, "learning_rate": 0.003,
              "early_stopping_patience": 4},
    "gate": {"min_accuracy": 0.5, "min_f1_macro": 0.5, "min_improvement": 0.01},
    "registry": {"model_name": "tiny-digits"},
    "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "artifact_root": "mlartifacts",
               "experiment_name": "tiny"},
}


def write_params(project: Path, overrides: dict | None = None, name: str = "params.yaml") -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for source in (TINY_PARAMS, overrides or {}):
        for section, values in source.items():
            params[section].update(values)
    path = project / name
    path.write_text(yaml.safe_dump(params))
    return path


def make_project(root: Path, labels=range(4), per_class: int = 25) -> Path:
    """A project folder as a user has it: params.yaml, data/<label>/, DVC with a remote."""
    from dvc.repo import Repo

    root.mkdir(parents=True, exist_ok=True)
    write_digits(root / "data", per_class=per_class, labels=labels)
    Repo.init(str(root), no_scm=True).close()
    (root / ".dvc" / "config").write_text(
        "[core]\n    no_scm = true\n    remote = local\n    analytics = false\n"
        "['remote \"local\"']\n    url = ../dvc-storage\n")
    write_params(root)
    return root


def visionops(*args: str, env: dict | None = None, timeout: float = 600):
    """The `visionops` command of this environment, run to its end."""
    return subprocess.run([str(Path(sys.executable).parent / "visionops"), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def digits(folder: Path, label: int, first: int, count: int) -> Path:
    """The `first`..`first + count - 1`th digits of one class as PNGs in folder/<label>/."""
    scratch = folder.parent / f".scratch-{folder.name}-{label}-{first}"
    write_digits(scratch, per_class=first + count, labels=[label])
    (folder / str(label)).mkdir(parents=True, exist_ok=True)
    for image in sorted((scratch / str(label)).iterdir())[first:]:
        shutil.move(image, folder / str(label) / f"{first}-{image.name}")
    shutil.rmtree(scratch)
    return folder
