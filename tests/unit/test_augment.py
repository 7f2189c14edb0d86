import keras
import numpy as np
import pytest
from PIL import Image

from visionops.core.augment import GRID_CELL_PX, augmented_grid, build_augmenter
from visionops.core.config import AugmentParams


@pytest.mark.parametrize("params", [
    AugmentParams(enabled=False, flip="horizontal", rotation=0.3, zoom=0.1, translation=0.1,
                  contrast=0.2, brightness=0.2),
    AugmentParams(enabled=True),
    AugmentParams(enabled=True, flip="none", rotation=0.0, zoom=0.0, translation=0.0,
                  contrast=0.0, brightness=0.0),
])
def test_no_augmenter_when_disabled_or_all_factors_zero(params):
    assert build_augmenter(params, seed=1) is None


def layer_types(augmenter):
    return [type(layer) for layer in augmenter.layers]


def test_augmenter_layers_follow_params():
    params = AugmentParams(enabled=True, flip="vertical", rotation=0.1, zoom=0.2,
                           translation=0.05, contrast=0.3, brightness=0.2)
    augmenter = build_augmenter(params, seed=1)
    assert layer_types(augmenter) == [
        keras.layers.Rescaling, keras.layers.RandomFlip, keras.layers.RandomRotation,
        keras.layers.RandomZoom, keras.layers.RandomTranslation, keras.layers.RandomContrast,
        keras.layers.RandomBrightness, keras.layers.ReLU,
    ]
    only_zoom = build_augmenter(AugmentParams(enabled=True, zoom=0.1), seed=1)
    assert layer_types(only_zoom) == [keras.layers.Rescaling, keras.layers.RandomZoom,
                                      keras.layers.ReLU]
    seeds = [layer.seed for layer in augmenter.layers[1:-1]]
    assert len(set(seeds)) == len(seeds)  # independent draws, not one shared stream


def pictures(n=8, size=24, channels=3, seed=0):
    """uint8 images with structure (a bright corner block over noise), none symmetric."""
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 200, (n, size, size, channels), dtype=np.uint8)
    images[:, : size // 3, : size // 2] = 230
    return images


@pytest.mark.parametrize("params, layer", [
    (AugmentParams(enabled=True, flip="horizontal"), keras.layers.RandomFlip),
    (AugmentParams(enabled=True, rotation=0.2), keras.layers.RandomRotation),
    (AugmentParams(enabled=True, zoom=0.3), keras.layers.RandomZoom),
    (AugmentParams(enabled=True, translation=0.2), keras.layers.RandomTranslation),
    (AugmentParams(enabled=True, contrast=0.5), keras.layers.RandomContrast),
    (AugmentParams(enabled=True, brightness=0.3), keras.layers.RandomBrightness),
])
def test_each_transform_alone_changes_uint8_pixels_into_float32_0_255(params, layer):
    augmenter = build_augmenter(params, seed=5)
    assert layer_types(augmenter) == [keras.layers.Rescaling, layer, keras.layers.ReLU]
    images = pictures()
    out = np.asarray(augmenter(images, training=True))
    assert out.dtype == np.float32 and out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 255.0
    assert not np.allclose(out, images, atol=1.0)
    # off the training path the layers pass pixels through, only cast
    np.testing.assert_array_equal(np.asarray(augmenter(images, training=False)), images)


STRONG = AugmentParams(enabled=True, flip="horizontal_and_vertical", rotation=0.5, zoom=0.5,
                       translation=0.4, contrast=1.0, brightness=1.0)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_strong_augmentation_keeps_float32_pixels_within_0_255(policy):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        augmenter = build_augmenter(STRONG, seed=2)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    images = np.concatenate([np.full((4, 16, 16, 1), 255, np.uint8),
                             np.zeros((4, 16, 16, 1), np.uint8),
                             pictures(8, 16, 1)])
    for batch in (images, images.astype(np.float32)):
        out = np.asarray(augmenter(batch, training=True))
        assert out.dtype == np.float32
        assert out.min() == 0.0 and out.max() == 255.0


def test_rotation_alone_does_not_overshoot_255():
    # bilinear weights that do not sum to exactly 1: 255.00002 without the final clip
    augmenter = build_augmenter(AugmentParams(enabled=True, rotation=0.5), seed=3)
    out = np.asarray(augmenter(np.full((16, 32, 32, 3), 255, np.uint8), training=True))
    assert out.max() == 255.0


def test_brightness_shifts_and_contrast_stretches_each_image_about_its_mean():
    images = np.random.default_rng(1).integers(100, 156, (8, 16, 16, 1), np.uint8)
    x = images.astype(np.float32)
    brightness = build_augmenter(AugmentParams(enabled=True, brightness=0.1), seed=3)
    shift = np.asarray(brightness(images, training=True)) - x
    per_image = shift.reshape(8, -1)
    np.testing.assert_allclose(per_image, per_image[:, :1].repeat(per_image.shape[1], 1),
                               atol=1e-3)  # one offset per image, within +-0.1 * 255
    assert np.abs(per_image[:, 0]).max() <= 0.1 * 255 + 1e-3
    assert len(np.unique(np.round(per_image[:, 0], 3))) > 1

    contrast = build_augmenter(AugmentParams(enabled=True, contrast=0.5), seed=3)
    out = np.asarray(contrast(images, training=True))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=0.01)
    ratio = out.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))
    assert np.all((ratio >= 0.5 - 1e-3) & (ratio <= 1.5 + 1e-3))
    assert np.ptp(ratio) > 0.05


def test_same_seed_same_augmentation_other_seed_another():
    images = pictures()
    first = build_augmenter(STRONG, seed=7)(images, training=True)
    again = build_augmenter(STRONG, seed=7)(images, training=True)
    other = build_augmenter(STRONG, seed=8)(images, training=True)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.allclose(np.asarray(first), np.asarray(other))


@pytest.mark.parametrize("channels", [1, 3])
def test_augmented_grid_png_has_one_cell_per_image_and_copy(tmp_path, channels):
    images = pictures(n=3, size=20, channels=channels)
    augmenter = build_augmenter(STRONG, seed=4)
    path = augmented_grid(images, augmenter, tmp_path / "grid.png", columns=5, seed=1)
    assert path == tmp_path / "grid.png"
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (5 * GRID_CELL_PX, 3 * GRID_CELL_PX)
        pixels = np.asarray(picture.convert("RGB"))
    cell = pixels[GRID_CELL_PX: 2 * GRID_CELL_PX]  # second row, away from the titles
    assert cell.std() > 20  # images drawn, not a blank canvas
    if channels == 1:
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])  # gray colour map

    again = augmented_grid(images, augmenter, tmp_path / "again.png", columns=5, seed=1)
    other = augmented_grid(images, augmenter, tmp_path / "other.png", columns=5, seed=2)
    assert again.read_bytes() == path.read_bytes()
    assert other.read_bytes() != path.read_bytes()


def test_augmented_grid_leaves_the_training_augmenters_draws_alone(tmp_path):
    images = pictures(n=2)
    used = build_augmenter(STRONG, seed=9)
    augmented_grid(images, used, tmp_path / "grid.png", columns=3)
    fresh = build_augmenter(STRONG, seed=9)
    np.testing.assert_array_equal(np.asarray(used(images, training=True)),
                                  np.asarray(fresh(images, training=True)))


def test_augmented_grid_rejects_other_shapes(tmp_path):
    augmenter = build_augmenter(STRONG, seed=9)
    with pytest.raises(ValueError, match="expected"):
        augmented_grid(np.zeros((2, 8, 8), np.uint8), augmenter, tmp_path / "g.png")
    with pytest.raises(ValueError, match="expected"):
        augmented_grid(np.zeros((2, 8, 8, 4), np.uint8), augmenter, tmp_path / "g.png")
