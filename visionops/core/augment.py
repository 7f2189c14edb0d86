"""Photo augmentation: Keras random layers run on whole training batches only (see
visionops.core.training.training_datasets), and a picture of what they do."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from visionops.core.config import AugmentParams

PIXEL_RANGE = (0, 255)
GRID_CELL_PX = 128  # each image's square in augmented_grid's PNG
GRID_DPI = 100


def build_augmenter(params: AugmentParams, seed: int) -> keras.Sequential | None:
    """Keras random layers for the transforms `params` sets, or None when there are none.

    Takes batches of raw pixels 0..255 (uint8 or float) and returns float32 pixels, still
    within [0, 255], computed in float32 whatever the global mixed-precision policy. Call it
    with training=True; each layer draws from its own seed (`seed`, `seed + 1`, ...).
    """
    if not params.enabled:
        return None
    transforms = []
    if params.flip != "none":
        transforms.append((keras.layers.RandomFlip, {"mode": params.flip}))
    if params.rotation:
        transforms.append((keras.layers.RandomRotation, {"factor": params.rotation}))
    if params.zoom:
        transforms.append((keras.layers.RandomZoom, {"height_factor": params.zoom}))
    if params.translation:
        transforms.append((keras.layers.RandomTranslation,
                           {"height_factor": params.translation,
                            "width_factor": params.translation}))
    if params.contrast:
        transforms.append((keras.layers.RandomContrast,
                           {"factor": params.contrast, "value_range": PIXEL_RANGE}))
    if params.brightness:
        transforms.append((keras.layers.RandomBrightness,
                           {"factor": params.brightness, "value_range": PIXEL_RANGE}))
    if not transforms:
        return None
    # RandomContrast fails on uint8 and RandomBrightness wraps around, hence the cast first;
    # bilinear resampling overshoots 255 by a rounding error, hence the clip last.
    layers = [keras.layers.Rescaling(1.0, dtype="float32", name="to_float32")]
    layers += [layer(**kwargs, seed=seed + i, dtype="float32")
               for i, (layer, kwargs) in enumerate(transforms)]
    layers.append(keras.layers.ReLU(max_value=float(PIXEL_RANGE[1]), dtype="float32",
                                    name="clip_0_255"))
    return keras.Sequential(layers, name="augment")


def augmented_grid(images_uint8: np.ndarray, augmenter: keras.Sequential, path: Path,
                   columns: int = 8, seed: int = 0) -> Path:
    """A PNG of one row per image, (N, H, W, 1 or 3) uint8: the original, then
    `columns - 1` augmented versions, GRID_CELL_PX square pixels a cell.

    Draws from a copy of `augmenter` re-seeded from `seed`, so the picture is repeatable
    and training's own random stream is left untouched."""
    from matplotlib.figure import Figure

    if images_uint8.ndim != 4 or images_uint8.shape[-1] not in (1, 3):
        raise ValueError(f"expected (N, H, W, 1 or 3) images, got {images_uint8.shape}")
    if columns < 2:
        raise ValueError("columns must leave room for the original and one augmented copy")
    copy = keras.Sequential([type(layer).from_config(_reseeded(layer.get_config(), seed + i))
                             for i, layer in enumerate(augmenter.layers)])
    rows = len(images_uint8)
    cell_inches = GRID_CELL_PX / GRID_DPI
    fig = Figure(figsize=(columns * cell_inches, rows * cell_inches))
    axes = fig.subplots(rows, columns, squeeze=False)
    for row, image in zip(axes, images_uint8, strict=True):
        copies = np.repeat(image[None], columns - 1, axis=0)
        augmented = np.asarray(copy(copies, training=True))
        shown = [image, *np.clip(np.rint(augmented), 0, 255).astype(np.uint8)]
        for ax, picture in zip(row, shown, strict=True):
            if picture.shape[-1] == 1:
                ax.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(picture)
            ax.set_axis_off()
    axes[0, 0].set_title("original", fontsize=9)
    for ax in axes[0, 1:]:
        ax.set_title("augmented", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.25 / rows,
                        wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=GRID_DPI)
    return Path(path)


def _reseeded(config: dict, seed: int) -> dict:
    return {**config, "seed": seed} if "seed" in config else config
