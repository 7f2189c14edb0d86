"""Exports (SavedModel, TFLite, ONNX) of a tiny model, run by their own runtimes: published
when they reproduce the Keras model, refused and removed when they do not."""

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf

from visionops.io.exports import FORMATS, export_model, tflite_predict

FIGURES = {"max_abs_diff", "argmax_agreement", "seconds", "bytes"}


def tiny_model(seed: int, dtype: str = "float32") -> keras.Model:
    """Raw pixels in, rescaled inside the model, as the project's models take them."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Rescaling(1 / 255, dtype=dtype),
        keras.layers.Conv2D(4, 3, activation="relu", dtype=dtype),
        keras.layers.GlobalAveragePooling2D(dtype=dtype),
        keras.layers.Dense(3, activation="softmax", dtype="float32"),
    ])


def pixels(rows: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model(1)
    out = tmp_path_factory.mktemp("exports") / "export"
    return model, out, export_model(model, out, pixels(), FORMATS, tolerance=1e-5)


def test_every_format_is_published_with_its_figures(exported):
    _, out, report = exported
    assert report.refused == {}
    assert report.published == [out / "saved_model", out / "model.tflite", out / "model.onnx"]
    assert sorted(path.name for path in out.iterdir()) == [
        "model.onnx", "model.tflite", "saved_model"]
    for fmt, check in report.checks.items():
        assert set(check) == FIGURES, fmt
        assert check["argmax_agreement"] == 1.0
        assert 0 <= check["max_abs_diff"] <= 1e-5
        assert check["seconds"] > 0
    assert report.checks["onnx"]["bytes"] == (out / "model.onnx").stat().st_size
    assert report.checks["saved_model"]["bytes"] > (out / "saved_model" /
                                                    "saved_model.pb").stat().st_size
    metrics = report.metrics()
    assert metrics["export_onnx_max_abs_diff"] == report.checks["onnx"]["max_abs_diff"]
    assert {metrics[f"export_{fmt}_published"] for fmt in FORMATS} == {1.0}
    assert report.tags() == {f"export.{fmt}": "published" for fmt in FORMATS}


def test_each_runtime_reproduces_the_keras_model_on_raw_pixels(exported):
    model, out, _ = exported
    x = pixels(5).astype(np.float32)
    keras_says = model.predict(x, verbose=0)

    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    assert onnx_input.type == "tensor(float)"  # the model's own float32 input, unchanged
    np.testing.assert_allclose(session.run(None, {onnx_input.name: x})[0], keras_says,
                               atol=1e-6)
    saved_model = tf.saved_model.load(str(out / "saved_model"))
    np.testing.assert_allclose(saved_model.serve(x), keras_says, atol=1e-6)
    np.testing.assert_allclose(tflite_predict(out / "model.tflite", x), keras_says, atol=1e-6)


def test_exports_that_do_not_reproduce_the_reference_are_refused_and_removed(tmp_path):
    model, other = tiny_model(1), tiny_model(2)
    x = pixels()
    report = export_model(model, tmp_path, x, FORMATS, tolerance=1e-4,
                          expected=other.predict(x.astype(np.float32), verbose=0))
    assert report.published == []
    assert list(tmp_path.iterdir()) == []
    assert set(report.refused) == set(FORMATS)
    assert "differs by up to" in report.refused["onnx"]
    assert report.checks["onnx"]["max_abs_diff"] > 1e-4  # the figures are still reported
    assert report.metrics()["export_onnx_published"] == 0.0
    assert report.tags()["export.onnx"] == report.refused["onnx"]


def test_a_different_class_is_refused_even_within_the_tolerance(tmp_path):
    model, x = tiny_model(1), pixels()
    # each row's probabilities moved one class along: the same values, other classes
    expected = np.roll(model.predict(x.astype(np.float32), verbose=0), 1, axis=1)
    report = export_model(model, tmp_path, x, ["onnx"], tolerance=1.0, expected=expected)
    assert report.published == []
    assert not (tmp_path / "model.onnx").exists()
    assert report.checks["onnx"]["argmax_agreement"] < 1.0
    assert "picks the Keras model's class on only" in report.refused["onnx"]
    assert "differs" not in report.refused["onnx"]


def test_only_the_asked_formats_are_written(tmp_path):
    (tmp_path / "saved_model").mkdir()  # an earlier attempt's, of another model
    (tmp_path / "model.onnx").write_bytes(b"stale")
    report = export_model(tiny_model(1), tmp_path, pixels(), ["tflite"])
    assert report.published == [tmp_path / "model.tflite"]
    assert list(tmp_path.iterdir()) == [tmp_path / "model.tflite"]  # no SavedModel left
    assert set(report.checks) == {"tflite"}
    with pytest.raises(ValueError, match="unknown export formats"):
        export_model(tiny_model(1), tmp_path, pixels(), ["tflite", "coreml"])
    with pytest.raises(ValueError, match="at least one row"):
        export_model(tiny_model(1), tmp_path, pixels(0), ["tflite"])


def test_a_mixed_precision_model_is_exported_in_float32(tmp_path):
    model, x = tiny_model(1, dtype="mixed_bfloat16"), pixels()
    report = export_model(model, tmp_path, x, ["tflite", "onnx"])
    assert report.refused == {}, report.refused
    assert report.published == [tmp_path / "model.tflite", tmp_path / "model.onnx"]
    for check in report.checks.values():  # checked against the float32 copy they are of
        assert check["argmax_agreement"] == 1.0
        assert check["max_abs_diff"] <= 1e-5
    # bfloat16 keeps 8 bits of mantissa: the copy is close to the model, not identical
    assert 0 < report.float32_copy_max_abs_diff <= 0.05
    types = {tensor.data_type for tensor in onnx.load(tmp_path / "model.onnx").graph.initializer}
    assert onnx.TensorProto.FLOAT in types and onnx.TensorProto.BFLOAT16 not in types
    assert model.layers[1].dtype_policy.name == "mixed_bfloat16"  # the model is unchanged


def test_the_float32_copy_keeps_a_normalization_layers_statistics(tmp_path):
    """EfficientNet normalises inside itself; its float32 copy must too, or every export
    of a mixed-precision EfficientNet is checked against a wrong reference."""
    from visionops.io.exports import float32_copy

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Normalization(mean=[100.0, 120.0, 140.0], variance=[900.0, 400.0, 100.0],
                                   dtype="mixed_bfloat16"),
        keras.layers.GlobalAveragePooling2D(dtype="mixed_bfloat16"),
        keras.layers.Dense(3, activation="softmax", dtype="float32"),
    ])
    x = pixels().astype(np.float32)
    copy = float32_copy(model)
    assert copy is not model
    np.testing.assert_allclose(copy.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=0.02)
    report = export_model(model, tmp_path, x, ["onnx"])
    assert report.float32_copy_max_abs_diff < 0.02
    assert report.metrics()["export_float32_copy_max_abs_diff"] < 0.02
