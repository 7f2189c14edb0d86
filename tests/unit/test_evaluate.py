import keras
import numpy as np
import pytest
from PIL import Image

from visionops.core.metrics import (
    evaluate_model,
    plot_confusion_matrix,
    plot_learning_curves,
    score,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_score_by_hand():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    evaluation = score(y_true, y_pred, ["a", "b", "c"])
    # per class precision 1/2, 2/3, 1; recall 1/2, 1, 1/2; f1 1/2, 4/5, 2/3
    assert evaluation.metrics == pytest.approx({
        "accuracy": 4 / 6,
        "precision_macro": (1 / 2 + 2 / 3 + 1) / 3,
        "recall_macro": (1 / 2 + 1 + 1 / 2) / 3,
        "f1_macro": (1 / 2 + 4 / 5 + 2 / 3) / 3,
    })
    np.testing.assert_array_equal(evaluation.confusion, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert evaluation.report["b"]["precision"] == pytest.approx(2 / 3)
    assert evaluation.report["c"]["support"] == 2
    np.testing.assert_array_equal(evaluation.predictions, y_pred)


def test_score_perfect_and_unknown_predictions():
    perfect = score(np.array([0, 1, 1]), np.array([0, 1, 1]), ["a", "b"])
    assert perfect.metrics == pytest.approx(dict.fromkeys(
        ("accuracy", "precision_macro", "recall_macro", "f1_macro"), 1.0))
    unknown = score(np.array([0, 1]), np.array([0, -1]), ["a", "b"])  # -1: a label not known
    assert unknown.metrics["accuracy"] == 0.5
    np.testing.assert_array_equal(unknown.confusion, [[1, 0], [0, 0]])


def pixel_model(image_size: int, n_outputs: int) -> keras.Model:
    """Output k is the brightness of pixel (0, k): fully predictable."""
    model = keras.Sequential([keras.Input((image_size, image_size, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(n_outputs, use_bias=False)])
    kernel = np.zeros((image_size * image_size, n_outputs), dtype=np.float32)
    for k in range(n_outputs):
        kernel[k, k] = 1.0
    model.layers[-1].set_weights([kernel])
    return model


@pytest.fixture
def bright_pixel_images(tmp_path):
    """test/<k>.png: 8x8 black with pixel (0, k) white, for k = 0, 1, 2."""
    paths = []
    for k in range(3):
        pixels = np.zeros((8, 8), dtype=np.uint8)
        pixels[0, k] = 255
        path = tmp_path / "test" / f"{k}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(f"test/{k}.png")
    return tmp_path, paths


def test_evaluate_model_in_the_same_class_order(bright_pixel_images):
    data_dir, paths = bright_pixel_images
    evaluation = evaluate_model(pixel_model(8, 3), data_dir, paths, np.array([0, 1, 2]),
                                ["a", "b", "c"])
    np.testing.assert_array_equal(evaluation.predictions, [0, 1, 2])
    assert evaluation.metrics["accuracy"] == 1.0


def test_evaluate_model_maps_model_class_names(bright_pixel_images):
    data_dir, paths = bright_pixel_images
    # the model's output 0 means "c", 1 means "a", 2 means "b"
    evaluation = evaluate_model(pixel_model(8, 3), data_dir, paths, np.array([2, 0, 1]),
                                ["a", "b", "c"], model_class_names=["c", "a", "b"])
    np.testing.assert_array_equal(evaluation.predictions, [2, 0, 1])
    assert evaluation.metrics["accuracy"] == 1.0


def test_evaluate_model_counts_unknown_labels_as_wrong(bright_pixel_images):
    data_dir, paths = bright_pixel_images
    evaluation = evaluate_model(pixel_model(8, 3), data_dir, paths, np.array([0, 1, 2]),
                                ["a", "b", "c"], model_class_names=["a", "b", "zebra"])
    np.testing.assert_array_equal(evaluation.predictions, [0, 1, -1])
    assert evaluation.metrics["accuracy"] == pytest.approx(2 / 3)


def test_evaluate_model_uses_the_models_own_input_size(bright_pixel_images):
    data_dir, paths = bright_pixel_images
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3)])
    evaluation = evaluate_model(model, data_dir, paths, np.array([0, 1, 2]), ["a", "b", "c"])
    assert evaluation.predictions.shape == (3,)


def test_plot_confusion_matrix_writes_a_png(tmp_path):
    path = plot_confusion_matrix(np.array([[3, 1], [0, 4]]), ["cat", "dog"], tmp_path / "cm.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    with Image.open(path) as image:
        image.load()
        assert image.width > 50


def test_plot_learning_curves_writes_pngs(tmp_path):
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8]}
    paths = plot_learning_curves(history, tmp_path)
    assert [p.name for p in paths] == ["learning_curve_loss.png", "learning_curve_accuracy.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.load()
    assert plot_learning_curves({"val_loss": [1.0]}, tmp_path) == []


def test_class_absent_from_test_split_does_not_lower_macro_scores():
    evaluation = score(np.array([0, 1, 1]), np.array([0, 1, 1]), ["a", "b", "c"])
    assert evaluation.metrics["f1_macro"] == 1.0
