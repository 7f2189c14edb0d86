import keras
import numpy as np
import pytest

from visionops.core.augment import build_augmenter, make_datasets
from visionops.core.config import AugmentParams

ROTATE_AND_FLIP = AugmentParams(enabled=True, flip="horizontal", rotation=0.2)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x_train = rng.random((20, 16, 16, 1), dtype=np.float32)
    y_train = np.arange(20, dtype=np.int64)  # label = row index, to check pairs stay together
    x_val = rng.random((7, 16, 16, 1), dtype=np.float32)
    y_val = np.arange(7, dtype=np.int64)
    return x_train, y_train, x_val, y_val


def batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


@pytest.mark.parametrize("params", [
    AugmentParams(enabled=False, flip="horizontal", rotation=0.3, zoom=0.1, translation=0.1),
    AugmentParams(enabled=True),
    AugmentParams(enabled=True, flip="none", rotation=0.0, zoom=0.0, translation=0.0),
])
def test_no_augmenter_when_disabled_or_all_factors_zero(params):
    assert build_augmenter(params, seed=1) is None


def test_augmenter_layers_follow_params():
    params = AugmentParams(enabled=True, flip="vertical", rotation=0.1, zoom=0.2,
                           translation=0.05)
    augmenter = build_augmenter(params, seed=1)
    assert [type(layer) for layer in augmenter.layers] == [
        keras.layers.RandomFlip, keras.layers.RandomRotation, keras.layers.RandomZoom,
        keras.layers.RandomTranslation,
    ]
    only_zoom = build_augmenter(AugmentParams(enabled=True, zoom=0.1), seed=1)
    assert [type(layer) for layer in only_zoom.layers] == [keras.layers.RandomZoom]


def test_batch_sizes_and_dtypes(arrays):
    train, val = make_datasets(*arrays, batch_size=8, augment=ROTATE_AND_FLIP, seed=3)
    train_batches, val_batches = batches(train), batches(val)
    assert [len(y) for _, y in train_batches] == [8, 8, 4]
    assert [len(y) for _, y in val_batches] == [7]
    for x, y in train_batches + val_batches:
        assert x.dtype == np.float32
        assert x.shape[1:] == (16, 16, 1)
        assert y.dtype == np.int64


def test_training_batches_are_augmented_validation_batches_are_not(arrays):
    x_train, y_train, x_val, y_val = arrays
    train, val = make_datasets(*arrays, batch_size=8, augment=ROTATE_AND_FLIP, seed=3)
    seen = []
    for x, y in batches(train):
        for image, label in zip(x, y, strict=True):
            assert not np.allclose(image, x_train[label], atol=1e-3)
            seen.append(int(label))
    assert sorted(seen) == list(range(20))
    ((x, y),) = batches(val)
    np.testing.assert_array_equal(x, x_val)
    np.testing.assert_array_equal(y, y_val)


def test_without_augmentation_training_batches_are_the_inputs_shuffled(arrays):
    x_train, y_train, *_ = arrays
    train, _ = make_datasets(*arrays, batch_size=8, augment=AugmentParams(), seed=3)
    one_epoch = batches(train)
    x = np.concatenate([x for x, _ in one_epoch])
    y = np.concatenate([y for _, y in one_epoch])
    assert sorted(y.tolist()) == list(range(20))
    assert y.tolist() != list(range(20))  # shuffled
    np.testing.assert_array_equal(x, x_train[y])
