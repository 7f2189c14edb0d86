"""Label images with the champion: the same preprocessing as training
(`visionops.images.load_images`), at the model's own input size."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionops.config import Params
from visionops.images import IMAGE_SUFFIXES, load_images
from visionops.registry import CHAMPION, Registry, RegistryError

BATCH = 1024  # images decoded and predicted at a time, so memory stays flat
INPUT_VALUES_PER_STEP = 2**20  # model.predict's batch: ~4 MB of input, at least 32 images


@dataclass
class LoadedVersion:
    model: object
    class_names: list[str] | None  # None: the version has no `class_names` tag
    version: str


def load_champion(params: Params) -> LoadedVersion:
    """The champion's model and class names, both from the one version the alias named
    when it was read, so that an alias moving meanwhile cannot mix two versions."""
    registry = Registry(params)
    champion = registry.champion()
    if champion is None:
        raise RegistryError(f"{registry.name} has no {CHAMPION} yet: run `visionops retrain`")
    loaded = load_registered_version(params, champion.version)
    if loaded.class_names is None:
        raise RegistryError(f"{registry.name} v{loaded.version} has no class_names tag, so "
                            "its outputs cannot be named")
    return loaded


def load_registered_version(params: Params, version: str | int) -> LoadedVersion:
    """The Keras model of one registered version and the class names it predicts, read
    from params' tracking URI, whatever MLflow's process-wide default is."""
    import mlflow

    registry = Registry(params)
    model_version = registry.version(version)
    # A `models:/` URI would be resolved against MLflow's default registry, whatever
    # tracking URI is passed along with it: ask this registry where the files are.
    files = registry.client.get_model_version_download_uri(model_version.name,
                                                           model_version.version)
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(files, dst_path=scratch,
                                                    tracking_uri=params.tracking_uri)
        model = mlflow.tensorflow.load_model(local)
    class_names = model_version.tags.get("class_names")
    return LoadedVersion(model, json.loads(class_names) if class_names else None,
                         str(model_version.version))


def image_paths(targets: Iterable[Path]) -> list[Path]:
    """Files as given; folders expanded to the images below them, sorted."""
    paths = []
    for target in map(Path, targets):
        if target.is_dir():
            paths += sorted(p for p in target.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif target.is_file():
            paths.append(target)
        else:
            raise FileNotFoundError(f"{target}: no such file or folder")
    return paths


def predict_paths(champion: LoadedVersion, paths: list[Path]) -> Iterator[dict]:
    _, size, _, channels = champion.model.input_shape
    # Keras's default of 32 images a step costs small images most of their time in the
    # steps themselves (5,300 images/s against 9,700 with 1,024 for the 28x28 digits).
    step = min(BATCH, max(32, INPUT_VALUES_PER_STEP // (size * size * channels)))
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        probabilities = champion.model.predict(load_images(chunk, size, channels),
                                               batch_size=step, verbose=0)
        for path, row in zip(chunk, probabilities, strict=True):
            best = int(np.argmax(row))
            yield {"path": str(path), "label": champion.class_names[best],
                   "probability": float(row[best])}
