"""Input pipelines: tf.data with cache and prefetch; Keras augmentation layers
run on whole training batches only."""

from __future__ import annotations

import keras
import tensorflow as tf

from visionops.core.config import AugmentParams


def build_augmenter(params: AugmentParams, seed: int) -> keras.Sequential | None:
    if not params.enabled:
        return None
    layers = []
    if params.flip != "none":
        layers.append(keras.layers.RandomFlip(params.flip, seed=seed))
    if params.rotation:
        layers.append(keras.layers.RandomRotation(params.rotation, seed=seed))
    if params.zoom:
        layers.append(keras.layers.RandomZoom(params.zoom, seed=seed))
    if params.translation:
        layers.append(keras.layers.RandomTranslation(params.translation, params.translation,
                                                     seed=seed))
    return keras.Sequential(layers, name="augment") if layers else None


def make_datasets(x_train, y_train, x_val, y_val, batch_size: int, augment: AugmentParams,
                  seed: int) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    autotune = tf.data.AUTOTUNE
    train = (tf.data.Dataset.from_tensor_slices((x_train, y_train)).cache()
             .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size))
    augmenter = build_augmenter(augment, seed)
    if augmenter is not None:
        train = train.map(lambda x, y: (augmenter(x, training=True), y),
                          num_parallel_calls=autotune)
    val = tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(batch_size).cache()
    return train.prefetch(autotune), val.prefetch(autotune)
