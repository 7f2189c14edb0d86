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
        "Rescaling",  # the model takes raw pixels
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
    for name in ("seed_cnn", "seed_cnn_bn", "mobilenet_v3_small"):
        assert build_model(TrainParams(architecture=name), (32, 32, 1), 3).name == name


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


def numbered_split(tmp_path, n_train=20, n_val=7):
    """8x8 gray PNGs whose pixels are all their label: train/<i>.png and val/<i>.png."""
    from PIL import Image

    from visionops.core.split import PreparedData, SplitFiles

    parts = {}
    for split, count in (("train", n_train), ("val", n_val), ("test", 2)):
        (tmp_path / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(tmp_path / split / f"{i}.png")
        parts[split] = SplitFiles([f"{split}/{i}.png" for i in range(count)],
                                  np.arange(count, dtype=np.int64))
    return PreparedData(tmp_path, [str(i) for i in range(n_train)], **parts, image_size=8,
                        channels=1)


def batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_training_batches_are_shuffled_augmented_and_validation_batches_are_not(tmp_path):
    from visionops.core.training import training_datasets

    data = numbered_split(tmp_path)
    plain, val = training_datasets(data, 8, AugmentParams(), seed=3)
    seen = batches(plain)
    assert [len(y) for _, y in seen] == [8, 8, 4]
    labels = np.concatenate([y for _, y in seen])
    assert sorted(labels.tolist()) == list(range(20)) != labels.tolist()  # shuffled
    for x, y in seen:  # pairs stay together; raw pixels until the model
        assert x.dtype == np.uint8
        np.testing.assert_array_equal(x[:, 0, 0, 0], y * 10)

    brighter = AugmentParams(enabled=True, brightness=0.5)
    augmented, val = training_datasets(data, 8, brighter, seed=3)
    for x, y in batches(augmented):
        assert x.dtype == np.float32
        assert not np.allclose(x[:, 0, 0, 0], y * 10)
    ((x, y),) = batches(val)
    np.testing.assert_array_equal(x[:, 0, 0, 0], y * 10)


def test_augmented_samples_are_drawn_for_the_run(tiny_prepared, tmp_path):
    augment = AugmentParams(enabled=True, rotation=0.1, contrast=0.2)
    result = train_model(tiny_prepared, TINY.model_copy(update={"epochs": 1}), augment,
                         tmp_path, verbose=0)
    assert result.augmented_samples == tmp_path / "augmented_samples.png"
    assert result.augmented_samples.stat().st_size > 1000
    unaugmented = train_model(tiny_prepared, TINY.model_copy(update={"epochs": 1}),
                              AugmentParams(), tmp_path / "plain", verbose=0)
    assert unaugmented.augmented_samples is None


def test_training_reads_its_cache_on_later_epochs(tiny_prepared, tmp_path):
    result = train_model(tiny_prepared, TINY, AugmentParams(), tmp_path / "work", verbose=0,
                         cache=tmp_path / "cache" / "v1")
    assert result.cached
    assert len(list((tmp_path / "cache" / "v1").glob("images-*.index"))) == 2  # train, val
    again = train_model(tiny_prepared, TINY, AugmentParams(), tmp_path / "again", verbose=0,
                        cache=tmp_path / "cache" / "v1")
    np.testing.assert_allclose(again.history["loss"], result.history["loss"], rtol=1e-5)


def test_a_cache_is_never_read_for_another_split(tmp_path):
    """The same data version split otherwise (another split.seed): new cache files."""
    from visionops.core.training import training_datasets

    data = numbered_split(tmp_path / "data")
    cache = tmp_path / "cache"
    cache.mkdir()
    first, _ = training_datasets(data, 8, AugmentParams(), seed=3, cache=cache)
    batches(first)
    data.train.paths, data.train.y = data.train.paths[:10], data.train.y[:10]
    second, _ = training_datasets(data, 8, AugmentParams(), seed=3, cache=cache)
    labels = np.concatenate([y for _, y in batches(second)])
    assert sorted(labels.tolist()) == list(range(10))
    assert len(list(cache.glob("images-*.index"))) == 2  # one per training split


def test_precision_auto_trains_under_the_resolved_policy(tiny_prepared, tmp_path):
    from visionops.core.precision import resolve_precision

    result = train_model(tiny_prepared, TINY.model_copy(update={"epochs": 1,
                                                                "precision": "auto"}),
                         AugmentParams(), tmp_path, verbose=0)
    assert result.precision == resolve_precision("auto") != "auto"
    assert result.model.layers[-1].dtype_policy.compute_dtype == "float32"  # the output
    assert result.model.layers[0].dtype_policy.name == result.precision
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after
