"""What a model's files may hold before anything loads them.

Loading runs code when a model carries a pickle (MLflow's `custom_objects.cloudpickle`),
Python files put on the import path, a loader module of its own choosing, or a Keras
lambda. A model of this project needs none of these: it is one `.keras` archive of
built-in layers (visionops.core.models). The checks read files only; they import and
deserialise nothing.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import yaml

PICKLE_SUFFIXES = (".pkl", ".pickle", ".cloudpickle", ".joblib", ".dill")
CODE_SUFFIXES = (".py", ".pyc", ".pyd", ".so")
LOADER_MODULE = "mlflow.tensorflow"
KERAS_MODULES = ("keras", "tensorflow.keras")
SAVE_FORMATS = ("tf", "keras")  # MLflow's default "tf" is a .keras archive under Keras 3
FLAVORS = ("python_function", "tensorflow")
KERAS_FILE = "data/model.keras"  # what MLflow loads for model_type keras, save_format tf
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


class UnsafeModelFiles(ValueError):
    """A model whose files could run code when loaded; nothing of it was loaded."""

    def __init__(self, what: str, findings: list[str]):
        self.findings = findings
        super().__init__(f"refused to load {what}: {'; '.join(findings)}; nothing of it "
                         "was loaded (a model here is one .keras file of built-in layers)")


def keras_archive_findings(path: Path, shown_as: str | None = None) -> list[str]:
    """Why the `.keras` archive at `path` could run code when loaded: a lambda anywhere
    in its config. `shown_as`: its name in the findings (its path by default)."""
    name = shown_as or str(path)
    if not zipfile.is_zipfile(path):
        return [f"{name} is not a Keras archive"]
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile) as exc:
        return [f"{name} has no readable config.json ({exc})"]
    return [f"{name} holds {found} (Python code, loaded only in Keras's unsafe mode)"
            for found in _lambdas(config)]


def _lambdas(config) -> Iterator[str]:
    if isinstance(config, list):
        for value in config:
            yield from _lambdas(value)
    elif isinstance(config, dict):
        inner = config.get("config")
        if config.get("class_name") == "Lambda":
            yield f"a Lambda layer {inner.get('name') if isinstance(inner, dict) else ''!r}"
        elif config.get("class_name") == "__lambda__" or config.get("function_type") == "lambda":
            yield "a Python lambda"
        else:
            for value in config.values():
                yield from _lambdas(value)


def model_folder_findings(folder: Path) -> list[str]:
    """Why the MLflow model in `folder` could run code when loaded, each finding naming
    its file (relative to `folder`); empty when it is safe to load."""
    findings = []
    for path in sorted(_files(folder)):
        relative = path.relative_to(folder).as_posix()
        if path.name.lower().endswith(PICKLE_SUFFIXES):
            findings.append(f"{relative} is a pickle (unpickling runs code)")
        elif path.name.lower().endswith(CODE_SUFFIXES):
            findings.append(f"{relative} is Python code")
        elif path.name.lower().endswith(".keras"):
            findings.extend(keras_archive_findings(path, relative))
        elif path.name.lower() in SAVED_MODEL_FILES:
            findings.append(f"{relative} is a TensorFlow SavedModel (restoring runs its ops)")
        elif path.name == "MLmodel" and path.parent != folder:
            findings.append(f"{relative} is a second MLmodel (mlflow.pyfunc reads it first)")
    findings.extend(_mlmodel_findings(folder))
    return findings


def _files(folder: Path) -> Iterator[Path]:
    for parent, _, names in os.walk(folder):
        for name in names:
            yield Path(parent, name)


def _mlmodel_findings(folder: Path) -> list[str]:
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        return []  # MLflow refuses it itself
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    findings = [f"MLmodel has a {name!r} flavor (only {', '.join(FLAVORS)} are allowed)"
                for name in flavors if name not in FLAVORS]
    findings += [f"MLmodel puts {flavor['code']!r} on the import path ({name} flavor)"
                 for name, flavor in flavors.items()
                 if isinstance(flavor, dict) and flavor.get("code")]
    pyfunc, tensorflow = (flavors.get(name) if isinstance(flavors.get(name), dict) else {}
                          for name in FLAVORS)
    # Each setting as MLflow resolves it: mlflow.tensorflow.load_model reads MLmodel,
    # mlflow.pyfunc reads data/*.txt; an absent save_format means h5 to both.
    checks = [
        ("python_function loader_module", pyfunc.get("loader_module"), (LOADER_MODULE,)),
        ("python_function data", pyfunc.get("data"), ("data",)),
        ("tensorflow data", tensorflow.get("data"), ("data",)),
        ("tensorflow model_type", tensorflow.get("model_type"), ("keras",)),
        ("tensorflow save_format", tensorflow.get("save_format"), SAVE_FORMATS),
        ("tensorflow keras_module", tensorflow.get("keras_module", "tensorflow.keras"),
         KERAS_MODULES),
        ("data/save_format.txt", _text(folder / "data" / "save_format.txt"), SAVE_FORMATS),
        ("data/keras_module.txt",
         _text(folder / "data" / "keras_module.txt", "tensorflow.keras"), KERAS_MODULES),
    ]
    findings += [f"{where} is missing" if value is None
                 else f"{where} is {value!r}, not one of {', '.join(allowed)}"
                 for where, value, allowed in checks if value not in allowed]
    if not (folder / KERAS_FILE).is_file():
        findings.append(f"{KERAS_FILE} is missing (the one file MLflow loads it from)")
    findings += [f"{path.relative_to(folder).as_posix()}/ is a TensorFlow SavedModel folder"
                 for path in sorted((folder / "data").rglob("variables")) if path.is_dir()]
    return findings


def _text(path: Path, default: str | None = None) -> str | None:
    return path.read_text().strip() if path.is_file() else default


def refuse_unsafe_model(folder: Path, what: str) -> None:
    """Raise UnsafeModelFiles, naming `what` (the version) and each file, unless the
    MLflow model in `folder` is safe to load."""
    if findings := model_folder_findings(Path(folder)):
        raise UnsafeModelFiles(what, findings)


def load_keras_file(path: Path):
    """The Keras model saved at `path`, refused (UnsafeModelFiles) if it holds code,
    loaded in Keras's safe mode."""
    import keras

    if findings := keras_archive_findings(Path(path), Path(path).name):
        raise UnsafeModelFiles(str(path), findings)
    return keras.models.load_model(path, safe_mode=True)
