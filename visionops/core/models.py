"""The models `train.architecture` chooses from: the seed CNNs and keras.applications
backbones under a new classification head.

Every model takes raw pixels, 0..255 (uint8 or float), and does its own preprocessing
inside with built-in Keras layers only, so a saved model loads with safe_mode and needs
no code of ours. The output layer computes in float32 under any mixed-precision policy.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from visionops.core.config import TrainParams

BACKBONE = "backbone"  # the name of the keras.applications model inside a built model
MIN_BACKBONE_SIZE = 32  # the smallest image side keras.applications takes
# the Caffe models' per-channel means, in their BGR order
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
# what Keras's ImageNet file for EfficientNet holds as the Normalization variance
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def seed_cnn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The seed tutorial's CNN, layer for layer, after a rescaling of pixels to [0, 1]."""
    return keras.Sequential([
        keras.Input(shape=input_shape),
        layers.Rescaling(1 / 255),
        layers.Conv2D(32, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax", dtype="float32"),
    ], name="seed_cnn")


def seed_cnn_bn(input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Deeper variant: two convolutions per block, each followed by BatchNormalization.
    Momentum 0.9 (not Keras's 0.99) lets the running statistics settle within the few
    steps per epoch a small dataset gives; with 0.99 the digits demo scored 0.23."""
    def block(filters: int) -> list[layers.Layer]:
        return [
            layers.Conv2D(filters, (3, 3), padding="same", use_bias=False),
            layers.BatchNormalization(momentum=0.9), layers.Activation("relu"),
            layers.Conv2D(filters, (3, 3), padding="same", use_bias=False),
            layers.BatchNormalization(momentum=0.9), layers.Activation("relu"),
            layers.MaxPooling2D((2, 2)),
        ]

    return keras.Sequential([
        keras.Input(shape=input_shape),
        layers.Rescaling(1 / 255),
        *block(32), *block(64), *block(128),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax", dtype="float32"),
    ], name="seed_cnn_bn")


SEED_ARCHITECTURES = {"seed_cnn": seed_cnn, "seed_cnn_bn": seed_cnn_bn}
# Each backbone with the preprocessing it expects: "inside" where the keras.applications
# model rescales 0..255 pixels itself, "caffe" for RGB->BGR minus the ImageNet means.
BACKBONES = {
    "mobilenet_v3_small": ("inside", lambda **kw: keras.applications.MobileNetV3Small(
        include_preprocessing=True, **kw)),
    "efficientnet_b0": ("inside", lambda **kw: keras.applications.EfficientNetB0(**kw)),
    "resnet50": ("caffe", lambda **kw: keras.applications.ResNet50(**kw)),
    "vgg16": ("caffe", lambda **kw: keras.applications.VGG16(**kw)),
}


def build_model(params: TrainParams, input_shape: tuple[int, ...], num_classes: int
                ) -> keras.Model:
    """The model `params.architecture` names, for `input_shape` (height, width, channels)
    images of 0..255 pixels and `num_classes` classes.

    A backbone starts from `params.pretrained` (None: random, "imagenet", or a weights
    file, e.g. one `save_backbone_weights` wrote) and sits under global average pooling,
    Dropout(`params.dropout`) and a softmax layer. A pretrained backbone's
    BatchNormalization layers are frozen, which in Keras 3 also keeps them in inference
    mode; calling the backbone with `training=False` would not (`fit` overrides it,
    keras-team/keras#20285). A random backbone trains its BatchNormalization, with a
    momentum of 0.9.
    Build (and compile) under `precision.precision_policy` for mixed precision."""
    architecture = params.architecture
    if architecture in SEED_ARCHITECTURES:
        if params.pretrained is not None:
            raise ValueError(f"train.pretrained ({params.pretrained!r}) needs a "
                             f"keras.applications backbone; train.architecture "
                             f"{architecture!r} has none")
        return SEED_ARCHITECTURES[architecture](input_shape, num_classes)
    height, width, channels = input_shape
    if min(height, width) < MIN_BACKBONE_SIZE:
        raise ValueError(f"train.architecture {architecture!r} needs data.image_size of at "
                         f"least {MIN_BACKBONE_SIZE}; got {height}x{width}")
    weights = params.pretrained
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise ValueError(f"train.pretrained {weights!r}: no such weights file")
    preprocessing, application = BACKBONES[architecture]
    backbone = application(include_top=False, weights=weights,
                           input_shape=(height, width, 3), name=BACKBONE)
    if architecture == "efficientnet_b0" and weights not in (None, "imagenet"):
        _fold_imagenet_stddev(backbone)
    if weights is not None:
        _freeze_batch_normalization(backbone)
    else:
        _settle_batch_normalization(backbone)

    pixels = keras.Input(shape=input_shape)
    if preprocessing == "caffe":
        x = _caffe_preprocessing(pixels, channels)
    elif channels == 1:
        x = layers.Concatenate(name="gray_to_rgb")([pixels, pixels, pixels])
    else:
        x = pixels
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(params.dropout, name="head_dropout")(x)
    probabilities = layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="probabilities")(x)
    return keras.Model(pixels, probabilities, name=architecture)


def _caffe_preprocessing(pixels: keras.KerasTensor, channels: int) -> keras.KerasTensor:
    """Keras's "caffe" preprocess_input as a fixed 1x1 convolution: RGB (or gray, copied
    to all three) to BGR, minus the ImageNet means."""
    conv = layers.Conv2D(3, 1, trainable=False, name="caffe_preprocessing")
    x = conv(pixels)
    kernel = np.zeros((1, 1, channels, 3), dtype=np.float32)
    for bgr in range(3):
        kernel[0, 0, 0 if channels == 1 else 2 - bgr, bgr] = 1.0
    conv.set_weights([kernel, -np.array(CAFFE_BGR_MEANS, dtype=np.float32)])
    return x


def _fold_imagenet_stddev(backbone: keras.Model) -> None:
    """Keras's ImageNet weights for EfficientNet hold the standard deviations as the
    Normalization variance and add a Rescaling that divides once more, but only when
    built with weights="imagenet". Loaded from a file, that Rescaling is missing: set the
    variance to the squared deviations so the input is normalized as in pretraining."""
    normalization = next(layer for layer in backbone.layers
                         if isinstance(layer, layers.Normalization))
    variance = keras.ops.convert_to_numpy(normalization.adapt_variance)
    mean = keras.ops.convert_to_numpy(normalization.adapt_mean)
    if (np.allclose(variance, IMAGENET_STDDEV_RGB, atol=1e-6)
            and np.allclose(mean, IMAGENET_MEAN_RGB, atol=1e-6)):
        normalization.adapt_variance.assign(np.square(IMAGENET_STDDEV_RGB))
        normalization.finalize_state()


def _settle_batch_normalization(backbone: keras.Model) -> None:
    """Momentum 0.9 for a backbone trained from random weights: with Keras's 0.99 or
    MobileNetV3's 0.999, the moving statistics inference uses are still mostly their
    initial values after the few hundred steps a small dataset gives (a MobileNetV3 from
    scratch scored below chance on a 4,000-photo test split), as seed_cnn_bn found."""
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.9


def _freeze_batch_normalization(backbone: keras.Model) -> None:
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


def has_backbone(model: keras.Model) -> bool:
    """Whether `model` has a keras.applications backbone (and so two training phases)."""
    return any(layer.name == BACKBONE for layer in model.layers)


def backbone_of(model: keras.Model) -> keras.Model:
    if not has_backbone(model):
        raise ValueError(f"model {model.name!r} has no backbone to freeze or unfreeze")
    return model.get_layer(BACKBONE)


def freeze_backbone(model: keras.Model) -> None:
    """Phase 1 of transfer learning: only the head trains. Compile after this."""
    backbone_of(model).trainable = False


def unfreeze_top(model: keras.Model, unfreeze_from: int | str | None) -> int:
    """Phase 2: the backbone's layers from `unfreeze_from` (a layer name, or an index into
    the backbone's layers, the input layer being 0, negative counting from the top) on
    become trainable, except BatchNormalization, which stays frozen and so in inference
    mode; None leaves the backbone frozen. Returns how many backbone layers now have
    trainable weights. Compile after this."""
    backbone = backbone_of(model)
    backbone_layers = backbone.layers
    if unfreeze_from is None:
        backbone.trainable = False
        return 0
    if isinstance(unfreeze_from, str):
        names = [layer.name for layer in backbone_layers]
        if unfreeze_from not in names:
            raise ValueError(f"train.fine_tune.unfreeze_from {unfreeze_from!r}: no such "
                             f"layer in {model.name}'s backbone")
        start = names.index(unfreeze_from)
    else:
        if not -len(backbone_layers) <= unfreeze_from < len(backbone_layers):
            raise ValueError(f"train.fine_tune.unfreeze_from {unfreeze_from}: {model.name}'s "
                             f"backbone has {len(backbone_layers)} layers")
        start = unfreeze_from % len(backbone_layers)
    backbone.trainable = True
    for index, layer in enumerate(backbone_layers):
        layer.trainable = index >= start
    _freeze_batch_normalization(backbone)
    return sum(1 for layer in backbone_layers if layer.trainable_weights)


def save_backbone_weights(model: keras.Model, path: str | Path) -> Path:
    """Write the backbone's weights to `path` (ending in .weights.h5), for another
    model of the same architecture to start from as `train.pretrained: PATH`."""
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"{path}: a backbone weights file must end in .weights.h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone_of(model).save_weights(path)
    return path
