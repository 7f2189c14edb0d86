"""The architectures: seed CNNs and keras.applications backbones on raw pixels, their
preprocessing, pretrained weights from a file, the two phases of fine-tuning, saving,
and mixed precision. Tiny images (32 px), a batch of two, eager steps: the graph of
a backbone's training step takes 10-30 s to trace on a CPU."""

import keras
import numpy as np
import pytest
from keras import layers

from visionops.core.config import ARCHITECTURES, TrainParams
from visionops.core.models import (
    BACKBONE,
    IMAGENET_MEAN_RGB,
    IMAGENET_STDDEV_RGB,
    build_model,
    freeze_backbone,
    has_backbone,
    save_backbone_weights,
    unfreeze_top,
)
from visionops.core.precision import precision_policy

SIZE = 32


def pixels(channels: int, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, channels),
                                                dtype=np.uint8)


def compiled(model: keras.Model) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss="sparse_categorical_crossentropy", run_eagerly=True)
    return model


def weights_of(model: keras.Model) -> list[np.ndarray]:
    return [np.array(weight) for weight in model.weights]


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_trains_a_step_on_raw_pixels(architecture, channels):
    model = compiled(build_model(TrainParams(architecture=architecture),
                                 (SIZE, SIZE, channels), 3))
    x = pixels(channels)
    before = weights_of(model)
    loss = model.train_on_batch(x, np.array([0, 2]))
    assert np.isfinite(loss)
    assert any(not np.array_equal(old, np.array(new))
               for old, new in zip(before, model.weights, strict=True))
    probabilities = model.predict_on_batch(x)
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert has_backbone(model) == (architecture not in ("seed_cnn", "seed_cnn_bn"))


def test_seed_cnn_rescales_pixels_first():
    model = build_model(TrainParams(architecture="seed_cnn"), (28, 28, 1), 10)
    assert isinstance(model.layers[0], layers.Rescaling)
    assert model.layers[0].scale == pytest.approx(1 / 255)
    assert model.count_params() == 93322  # the seed tutorial's, unchanged


def test_backbones_refuse_images_smaller_than_32():
    with pytest.raises(ValueError, match=r"train.architecture 'resnet50'.*data.image_size"):
        build_model(TrainParams(architecture="resnet50"), (28, 28, 1), 3)


def test_pretrained_needs_a_backbone_and_an_existing_file(tmp_path):
    with pytest.raises(ValueError, match="train.pretrained"):
        build_model(TrainParams(architecture="seed_cnn", pretrained="imagenet"),
                    (28, 28, 1), 3)
    with pytest.raises(ValueError, match="no such weights file"):
        build_model(TrainParams(architecture="vgg16",
                                pretrained=str(tmp_path / "none.weights.h5")),
                    (SIZE, SIZE, 3), 3)


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    """A MobileNetV3Small backbone's weights file, after one training step."""
    model = compiled(build_model(TrainParams(architecture="mobilenet_v3_small"),
                                 (SIZE, SIZE, 3), 4))
    model.train_on_batch(pixels(3), np.array([0, 3]))
    path = tmp_path_factory.mktemp("pretrained") / "mobilenet.weights.h5"
    save_backbone_weights(model, path)
    return path, weights_of(model.get_layer(BACKBONE))


def test_a_model_built_from_a_weights_file_starts_with_those_weights(mobilenet_weights):
    path, saved = mobilenet_weights
    # another image size, channel count and number of classes: only the backbone loads
    params = TrainParams(architecture="mobilenet_v3_small", pretrained=str(path))
    loaded = build_model(params, (48, 48, 1), 2).get_layer(BACKBONE)
    assert len(saved) == len(loaded.weights) > 100
    for expected, weight in zip(saved, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.array(weight), expected, err_msg=weight.path)
    random = build_model(TrainParams(architecture="mobilenet_v3_small"), (SIZE, SIZE, 3), 4)
    assert not all(np.array_equal(expected, np.array(weight)) for expected, weight
                   in zip(saved, random.get_layer(BACKBONE).weights, strict=True))


def test_pretrained_backbone_keeps_batch_normalization_frozen_random_one_trains_it(
        mobilenet_weights):
    path, _ = mobilenet_weights

    def batch_normalization_changed(pretrained: str | None) -> tuple[int, int]:
        """(BatchNormalization weights, how many of them one training step changed)"""
        model = build_model(TrainParams(architecture="mobilenet_v3_small",
                                        pretrained=pretrained), (SIZE, SIZE, 3), 2)
        weights = [w for layer in model.get_layer(BACKBONE).layers
                   if isinstance(layer, layers.BatchNormalization) for w in layer.weights]
        before = [np.array(w) for w in weights]
        compiled(model).train_on_batch(pixels(3), np.array([0, 1]))
        return len(weights), sum(not np.array_equal(old, new)
                                 for old, new in zip(before, weights, strict=True))

    count, changed = batch_normalization_changed(str(path))
    assert count > 0 and changed == 0  # statistics, scale and offset as pretrained
    count, changed = batch_normalization_changed(None)
    assert changed == count


def test_backbone_weights_file_must_be_named_weights_h5(tmp_path):
    model = build_model(TrainParams(architecture="mobilenet_v3_small"), (SIZE, SIZE, 3), 2)
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        save_backbone_weights(model, tmp_path / "backbone.h5")


@pytest.mark.parametrize("architecture", ["resnet50", "vgg16"])
@pytest.mark.parametrize("channels", [3, 1])
def test_caffe_preprocessing_equals_keras_preprocess_input(architecture, channels):
    model = build_model(TrainParams(architecture=architecture), (SIZE, SIZE, channels), 2)
    preprocessing = keras.Model(model.input, model.get_layer("caffe_preprocessing").output)
    x = pixels(channels, n=4, seed=1)
    rgb = np.repeat(x, 3, axis=-1) if channels == 1 else x
    preprocess_input = getattr(keras.applications, architecture).preprocess_input
    expected = preprocess_input(rgb.astype(np.float32))
    np.testing.assert_allclose(preprocessing.predict_on_batch(x), expected, atol=1e-4)
    assert not model.get_layer("caffe_preprocessing").trainable_weights


def test_efficientnet_from_an_imagenet_file_normalizes_as_in_pretraining(tmp_path):
    """Keras's ImageNet file stores the deviations as the Normalization variance and
    divides once more only when built with weights="imagenet"; from a file, the variance
    is squared instead, so the input is normalized the same way."""
    model = build_model(TrainParams(architecture="efficientnet_b0"), (SIZE, SIZE, 3), 2)
    normalization = next(layer for layer in model.get_layer(BACKBONE).layers
                         if isinstance(layer, layers.Normalization))
    normalization.adapt_mean.assign(IMAGENET_MEAN_RGB)
    normalization.adapt_variance.assign(IMAGENET_STDDEV_RGB)  # as in Keras's file
    path = save_backbone_weights(model, tmp_path / "efficientnet.weights.h5")

    loaded = build_model(TrainParams(architecture="efficientnet_b0", pretrained=str(path)),
                         (SIZE, SIZE, 3), 2).get_layer(BACKBONE)
    normalized = keras.Model(loaded.input, next(
        layer for layer in loaded.layers if isinstance(layer, layers.Normalization)).output)
    x = pixels(3).astype(np.float32)
    expected = (x / 255 - np.array(IMAGENET_MEAN_RGB)) / np.array(IMAGENET_STDDEV_RGB)
    np.testing.assert_allclose(normalized.predict_on_batch(x), expected, atol=1e-4)


def test_freeze_then_unfreeze_the_top_keeps_batch_normalization_frozen(mobilenet_weights):
    path, _ = mobilenet_weights
    model = build_model(TrainParams(architecture="mobilenet_v3_small", pretrained=str(path)),
                        (SIZE, SIZE, 3), 2)
    backbone = model.get_layer(BACKBONE)
    head = model.get_layer("probabilities")

    freeze_backbone(model)
    assert {w.path for w in model.trainable_weights} == {w.path for w in head.weights}

    unfrozen = unfreeze_top(model, -20)
    top = backbone.layers[-20:]
    assert unfrozen == sum(1 for layer in top if layer.weights
                           and not isinstance(layer, layers.BatchNormalization))
    assert unfrozen > 0
    assert not any(layer.trainable_weights for layer in backbone.layers[:-20])
    assert not any(layer.trainable for layer in backbone.layers
                   if isinstance(layer, layers.BatchNormalization))
    assert unfreeze_top(model, top[0].name) == unfrozen  # by name, the same layers

    before = {w.path: np.array(w) for w in backbone.weights}
    compiled(model).train_on_batch(pixels(3), np.array([0, 1]))
    changed = {w.path for w in backbone.weights if not np.array_equal(before[w.path], w)}
    trainable = {w.path for w in backbone.trainable_weights}
    assert changed and changed <= trainable  # frozen layers and BatchNorm statistics kept

    assert unfreeze_top(model, None) == 0
    assert not backbone.trainable_weights


def test_unfreeze_refuses_unknown_layers_and_models_without_a_backbone():
    model = build_model(TrainParams(architecture="mobilenet_v3_small"), (SIZE, SIZE, 3), 2)
    with pytest.raises(ValueError, match="no such layer"):
        unfreeze_top(model, "block99")
    with pytest.raises(ValueError, match="has .* layers"):
        unfreeze_top(model, 10_000)
    seed = build_model(TrainParams(architecture="seed_cnn"), (28, 28, 1), 2)
    assert not has_backbone(seed)
    with pytest.raises(ValueError, match="no backbone"):
        freeze_backbone(seed)


@pytest.mark.parametrize(("architecture", "channels"), [
    ("seed_cnn_bn", 1), ("mobilenet_v3_small", 1), ("vgg16", 3)])
def test_saved_model_loads_safely_with_equal_predictions(architecture, channels, tmp_path):
    model = build_model(TrainParams(architecture=architecture), (SIZE, SIZE, channels), 3)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = pixels(channels, n=3)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x),
                               atol=1e-6)
    assert has_backbone(loaded) == has_backbone(model)


@pytest.mark.parametrize("architecture", ["seed_cnn", "mobilenet_v3_small"])
def test_mixed_bfloat16_computes_in_bfloat16_and_outputs_float32(architecture):
    with precision_policy("mixed_bfloat16"):
        model = compiled(build_model(TrainParams(architecture=architecture),
                                     (SIZE, SIZE, 1), 3))
    assert keras.mixed_precision.global_policy().name == "float32"
    convolutions = [layer for layer in model._flatten_layers()
                    if isinstance(layer, layers.Conv2D)]
    assert convolutions
    assert all(layer.compute_dtype == "bfloat16" for layer in convolutions)
    assert all(w.dtype == "float32" for w in model.weights if w.trainable)
    x = pixels(1)
    model.train_on_batch(x, np.array([0, 1]))
    assert keras.ops.convert_to_numpy(model(x)).dtype == np.float32
