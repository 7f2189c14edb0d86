"""Fixtures for the unit tests: tiny image folders and helpers to write images."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from PIL import Image

from visionops.core.demo import write_digits


def write_image(path: Path, size: tuple[int, int] = (16, 16), mode: str = "L",
                fmt: str = "PNG", seed: int = 0) -> Path:
    """Write a random-noise image (distinct content per seed) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels)
    assert image.mode == mode
    image.save(path, format=fmt)
    return path


def make_digits(out: Path, per_class: int, keep: tuple[str, ...]) -> Path:
    """scikit-learn digits as data/<digit>/*.png, keeping only the classes in `keep`."""
    write_digits(out, per_class=per_class)
    for folder in out.iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder)
    return out


@pytest.fixture
def make_image():
    """The `write_image` helper, as a fixture (test modules can't import conftest reliably)."""
    return write_image


@pytest.fixture
def digits_folder():
    """The `make_digits` helper, as a fixture."""
    return make_digits


@pytest.fixture
def tiny_digits(tmp_path: Path) -> Path:
    """Three digit classes with six 8x8 PNGs each."""
    return make_digits(tmp_path / "data", per_class=6, keep=("0", "1", "2"))


@pytest.fixture
def png_file(tmp_path: Path) -> Path:
    return write_image(tmp_path / "good.png", size=(20, 12), mode="L")


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A throwaway sqlite store and artifact folder; the previous tracking URI is restored."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with _use_tracking_uri(uri):
        experiment_id = mlflow.create_experiment(
            "unit", artifact_location=(tmp_path / "artifacts").as_uri())
        yield MlflowClient(), experiment_id
        mlflow.end_run()
