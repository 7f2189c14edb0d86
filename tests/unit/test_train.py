import shutil

import keras
import numpy as np
import pytest

from visionops.core.config import AugmentParams, DataParams, SplitParams, TrainParams
from visionops.core.demo import write_digits
from visionops.core.models import build_model, seed_cnn, seed_cnn_bn
from visionops.core.split import assign_splits, prepare_data
from visionops.core.training import train_model
from visionops.io.validation import collect_facts

TINY = TrainParams(epochs=2, batch_size=16, seed=42, early_stopping_patience=5)


def layer_summary(model):
    summary = []
    for layer in model.layers:
        entry = type(layer).__name__
        if isinstance(layer, keras.layers.Conv2D):
            entry += f" {layer.filters} {layer.kernel_size} {layer.activation.__name__}"
        elif isinstance(layer, keras.layers.Dense):
            entry += f" {layer.units} {layer.activation.__name__}"
        elif isinstance(layer, keras.layers.MaxPooling2D):
            entry += f" {layer.pool_size}"
        elif isinstance(layer, keras.layers.Dropout):
            entry += f" {layer.rate}"
        summary.append(entry)
    return summary


def test_seed_cnn_matches_the_seed_tutorial():
    model = seed_cnn((28, 28, 1), 10)
    assert layer_summary(model) == [
        "Conv2D 32 (3, 3) relu",
        "MaxPooling2D (2, 2)",
        "Conv2D 64 (3, 3) relu",
        "MaxPooling2D (2, 2)",
        "Conv2D 64 (3, 3) relu",
        "Flatten",
        "Dense 64 relu",
        "Dropout 0.5",
        "Dense 10 softmax",
    ]
    assert model.input_shape == (None, 28, 28, 1)
    assert model.output_shape == (None, 10)
    # 320 + 18,496 + 36,928 (convolutions) + 36,928 + 650 (dense) for 28x28x1 and 10 classes
    assert model.count_params() == 93322


def test_seed_cnn_bn_has_batch_normalization():
    model = seed_cnn_bn((32, 32, 3), 4)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("BatchNormalization") == 6
    assert kinds.count("Conv2D") == 6
    assert model.output_shape == (None, 4)


def test_build_model_picks_the_architecture():
    assert build_model("seed_cnn", (28, 28, 1), 3).name == "seed_cnn"
    assert build_model("seed_cnn_bn", (28, 28, 1), 3).name == "seed_cnn_bn"


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits") / "data"
    write_digits(data_dir, per_class=15)
    for folder in data_dir.iterdir():
        if folder.name not in ("0", "1", "2"):
            shutil.rmtree(folder)
    table = assign_splits(collect_facts(data_dir), SplitParams())
    return prepare_data(data_dir, table, DataParams(image_size=28, channels=1))


def test_train_model_history_checkpoint_and_tensorboard(tiny_prepared, tmp_path):
    result = train_model(tiny_prepared, TINY, AugmentParams(), tmp_path / "work", verbose=0)
    assert result.epochs_run == 2
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        assert len(result.history[key]) == 2
        assert all(np.isfinite(result.history[key]))
    assert result.model.output_shape == (None, 3)
    assert result.checkpoint == tmp_path / "work" / "best.keras"
    assert result.checkpoint.is_file()
    restored = keras.models.load_model(result.checkpoint)
    assert restored.input_shape == (None, 28, 28, 1)
    events = list(result.tensorboard_dir.rglob("events.out.tfevents.*"))
    assert {e.parent.name for e in events} == {"train", "validation"}


def test_extra_callbacks_are_called(tiny_prepared, tmp_path):
    class CountEpochs(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None):
            CountEpochs.epochs += 1

    train_model(tiny_prepared, TINY.model_copy(update={"epochs": 1}), AugmentParams(),
                tmp_path, callbacks=[CountEpochs()], verbose=0)
    assert CountEpochs.epochs == 1


def test_same_seed_gives_identical_weights(tiny_prepared, tmp_path):
    first = train_model(tiny_prepared, TINY, AugmentParams(), tmp_path / "a", verbose=0)
    second = train_model(tiny_prepared, TINY, AugmentParams(), tmp_path / "b", verbose=0)
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.history["loss"] == second.history["loss"]


def test_different_seed_gives_different_weights(tiny_prepared, tmp_path):
    one = TINY.model_copy(update={"epochs": 1})
    first = train_model(tiny_prepared, one, AugmentParams(), tmp_path / "a", verbose=0)
    other = train_model(tiny_prepared, one.model_copy(update={"seed": 7}), AugmentParams(),
                        tmp_path / "b", verbose=0)
    assert not np.array_equal(first.model.get_weights()[0], other.model.get_weights()[0])


def test_mirrored_strategy_trains_the_same_model(tiny_prepared, tmp_path):
    plain = train_model(tiny_prepared, TINY, AugmentParams(), tmp_path / "plain", verbose=0)
    mirrored = train_model(tiny_prepared, TINY.model_copy(update={"strategy": "mirrored"}),
                           AugmentParams(), tmp_path / "mirrored", verbose=0)
    assert mirrored.epochs_run == plain.epochs_run == 2
    assert "Mirrored" in type(mirrored.model.weights[0].value).__name__
    # replicas draw other random streams, so the losses agree closely, not exactly
    np.testing.assert_allclose(mirrored.history["loss"], plain.history["loss"], rtol=0.05)
