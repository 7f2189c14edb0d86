"""A trained Keras model as deployable files: a TensorFlow SavedModel folder, a TFLite flat
buffer and an ONNX graph. Each export is run by its own runtime on a sample and published
only when it reproduces the Keras model's predictions (`export_model`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mlflow import MlflowClient

FORMATS = ("saved_model", "tflite", "onnx")
# where each format is written inside the export folder
FILE_NAMES = {"saved_model": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}


@dataclass
class ExportReport:
    """What `export_model` wrote and how each export compared with the Keras model."""

    published: list[Path] = field(default_factory=list)
    # format -> max_abs_diff and argmax_agreement (fraction of sample rows) against the
    # expected predictions, seconds to write it (TFLite: its conversion, and the SavedModel
    # it is converted from when that was not asked for), bytes on disk
    checks: dict[str, dict[str, float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # format -> why it is not published
    # a mixed-precision model is exported as a float32 copy (no half-precision CPU kernels
    # in ONNX Runtime or TFLite); how far that copy's probabilities are from the model's
    float32_copy_max_abs_diff: float | None = None

    def metrics(self) -> dict[str, float]:
        """The figures as MLflow metrics: export_<format>_<figure>, and export_<format>_published
        (1 or 0) for every format asked for."""
        published = {path.name for path in self.published}
        figures = {f"export_{fmt}_{name}": value
                   for fmt, check in self.checks.items() for name, value in check.items()}
        for fmt in {*self.checks, *self.refused}:
            figures[f"export_{fmt}_published"] = float(FILE_NAMES[fmt] in published)
        if self.float32_copy_max_abs_diff is not None:
            figures["export_float32_copy_max_abs_diff"] = self.float32_copy_max_abs_diff
        return figures

    def tags(self) -> dict[str, str]:
        """export.<format>: "published", or the reason it was refused."""
        published = {path.name for path in self.published}
        return {f"export.{fmt}": "published" if FILE_NAMES[fmt] in published else self.refused[fmt]
                for fmt in FORMATS if FILE_NAMES[fmt] in published or fmt in self.refused}


def export_model(model, out_dir: Path, sample: np.ndarray,
                 formats: Iterable[str] = FORMATS, tolerance: float = 1e-4,
                 expected: np.ndarray | None = None) -> ExportReport:
    """Write `model` into `out_dir` in each of `formats` and run every export on `sample`
    (pixels as the model takes them). An export is published when, on every sample row, its
    predictions have the same argmax as `expected` (by default the model's own predictions)
    and differ from them by at most `tolerance`; otherwise its files are removed and the
    reason is reported. A failing conversion is refused, not raised. Files of an earlier
    export in `out_dir` are removed first."""
    asked = set(formats)
    if asked - set(FORMATS):
        raise ValueError(f"unknown export formats {sorted(asked - set(FORMATS))}; "
                         f"known: {', '.join(FORMATS)}")
    formats = [fmt for fmt in FORMATS if fmt in asked]
    x = np.asarray(sample, dtype=model.inputs[0].dtype)
    if not len(x):
        raise ValueError("an export is checked on a sample: at least one row")
    exportable = float32_copy(model)
    report = ExportReport()
    if exportable is not model:
        exportable(x[:1])  # Keras exports only a model that has been called
    if expected is None:
        # what the exports are converted from: a mixed-precision model's float32 copy,
        # whose distance from the model itself is reported beside
        expected = exportable.predict(x, verbose=0)
        if exportable is not model:
            report.float32_copy_max_abs_diff = float(np.max(np.abs(
                expected - np.asarray(model.predict(x, verbose=0), dtype=np.float32))))
    expected = np.asarray(expected, dtype=np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILE_NAMES.values():
        _remove(out_dir / name)  # an earlier attempt's files are not this model's
    for fmt in formats:
        path = out_dir / FILE_NAMES[fmt]
        started = time.perf_counter()
        try:
            if fmt == "tflite":
                # converted from the SavedModel folder, written first if it was not asked for
                saved_model = out_dir / FILE_NAMES["saved_model"]
                if not saved_model.exists():
                    _write(exportable, "saved_model", saved_model)
                _write(exportable, fmt, path)
            else:
                _write(exportable, fmt, path)
            seconds = time.perf_counter() - started
            predicted = PREDICT[fmt](path, x)
        except Exception as exc:  # whatever a converter or a runtime raises refuses it
            report.refused[fmt] = f"{fmt} export failed: {type(exc).__name__}: {exc}"
            _remove(path)
            continue
        report.checks[fmt] = check = _compare(predicted, expected)
        check["seconds"], check["bytes"] = seconds, float(_size(path))
        problem = _problem(fmt, check, predicted.shape, expected.shape, tolerance)
        if problem is None:
            report.published.append(path)
        else:
            report.refused[fmt] = problem
            _remove(path)
    saved_model = out_dir / FILE_NAMES["saved_model"]
    if saved_model not in report.published:
        _remove(saved_model)  # written for the TFLite conversion only, or refused
    return report


def log_exports(client: MlflowClient, run_id: str, model, sample: np.ndarray,
                formats: Iterable[str] = FORMATS, tolerance: float = 1e-4,
                expected: np.ndarray | None = None) -> ExportReport:
    """Export `model` (`export_model`) and log to run `run_id` the published files under
    its `export/` artifacts, the figures as its metrics and each format's outcome as its
    tags. The report's paths were in a scratch folder, gone once this returns."""
    from mlflow.entities import Metric, RunTag

    with tempfile.TemporaryDirectory() as scratch:
        report = export_model(model, Path(scratch) / "export", sample, formats, tolerance,
                              expected)
        for path in report.published:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), f"export/{path.name}")
            else:
                client.log_artifact(run_id, str(path), "export")
    now = int(time.time() * 1000)
    client.log_batch(run_id,
                     metrics=[Metric(key, value, now, 0)
                              for key, value in report.metrics().items()],
                     tags=[RunTag(key, value) for key, value in report.tags().items()])
    return report


def float32_copy(model):
    """`model` itself when every layer computes in float32; else a copy of it with the same
    weights that does (a mixed_bfloat16 or mixed_float16 model): ONNX Runtime and TFLite
    have no CPU kernels for half-precision convolutions."""
    import keras

    def layers(of) -> Iterable:
        for layer in getattr(of, "layers", []):
            yield layer
            yield from layers(layer)

    if all(layer.dtype_policy.name == "float32" for layer in [model, *layers(model)]):
        return model

    def in_float32(layer):
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=in_float32, recursive=True)
    copy.set_weights(model.get_weights())
    for layer in layers(copy):  # set_weights fills a Normalization's adapted statistics;
        if isinstance(layer, keras.layers.Normalization):  # only this makes them its own
            layer.finalize_state()
    return copy


def _write(model, fmt: str, path: Path) -> None:
    if fmt == "saved_model":
        model.export(str(path), format="tf_saved_model", verbose=False)
    elif fmt == "tflite":
        import tensorflow as tf

        saved_model = path.parent / FILE_NAMES["saved_model"]
        path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert())
    else:
        model.export(str(path), format="onnx", verbose=False)


def saved_model_predict(saved_model: Path, x: np.ndarray) -> np.ndarray:
    """The predictions of a SavedModel folder written by Keras (its `serve` endpoint)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))  # held: its variables die with it
    return np.asarray(loaded.serve(x))


def tflite_predict(tflite: Path, x: np.ndarray) -> np.ndarray:
    """The predictions of a TFLite flat buffer for a batch `x` of float32 inputs."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(tflite))
    (input_detail,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(input_detail["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], x.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def onnx_predict(onnx: Path, x: np.ndarray) -> np.ndarray:
    """The predictions of an ONNX graph, run by ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    return session.run(None, {model_input.name: x})[0]


PREDICT = {"saved_model": saved_model_predict, "tflite": tflite_predict, "onnx": onnx_predict}


def _compare(predicted: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    if predicted.shape != expected.shape:
        return {"max_abs_diff": float("inf"), "argmax_agreement": 0.0}
    agreement = predicted.argmax(axis=-1) == expected.argmax(axis=-1)
    return {"max_abs_diff": float(np.max(np.abs(predicted - expected))),
            "argmax_agreement": float(agreement.mean())}


def _problem(fmt: str, check: dict[str, float], shape: tuple, expected_shape: tuple,
             tolerance: float) -> str | None:
    if shape != expected_shape:
        return f"{fmt} predicts shape {shape}, the Keras model {expected_shape}"
    problems = []
    if not check["max_abs_diff"] <= tolerance:  # NaN included
        problems.append(f"differs by up to {check['max_abs_diff']:.2e} "
                        f"(tolerance {tolerance:.1e})")
    if check["argmax_agreement"] < 1.0:
        problems.append(f"picks the Keras model's class on only "
                        f"{check['argmax_agreement']:.1%} of the sample")
    return f"{fmt} export {' and '.join(problems)}" if problems else None


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
