"""The one input pipeline (visionops.core.pipeline): uint8 pixels streamed from files,
EXIF orientation, input contracts, the on-disk cache."""

import numpy as np
import pytest
from PIL import Image

from visionops.core.pipeline import (
    PIXELS,
    UNIT_FLOAT,
    UnreadableImage,
    cache_folder,
    claim_cache,
    decode_image,
    image_dataset,
    load_pixels,
    predict_files,
    scale_for,
)


def upright() -> Image.Image:
    """16x16 gray: the top half white, the bottom half black."""
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[:8] = 255
    return Image.fromarray(pixels)


def test_exif_orientation_is_applied(tmp_path):
    # Stored rotated a quarter turn, as a phone does; the tag says how to show it.
    stored = upright().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=100, exif=exif)
    as_stored = np.asarray(stored.convert("L"), dtype=np.float32)
    assert as_stored[:, :8].mean() > 200 > 50 > as_stored[:, 8:].mean()  # white on the left

    pixels = decode_image(path, 16, 1)[..., 0].astype(np.float32)
    assert pixels[:8].mean() > 200 and pixels[8:].mean() < 50  # shown upright: white on top


def test_decode_gives_uint8_at_the_size_and_channels(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", size=(40, 30), mode="RGB")
    assert decode_image(path, 12, 3).shape == (12, 12, 3)
    gray = decode_image(path, 12, 1)
    assert gray.dtype == np.uint8 and gray.shape == (12, 12, 1)
    assert load_pixels([path, path], 8, 3).shape == (2, 8, 8, 3)
    assert load_pixels([], 8, 3).shape == (0, 8, 8, 3)


def test_a_bad_file_is_named(tmp_path):
    bad = tmp_path / "cat" / "not-an-image.png"
    bad.parent.mkdir()
    bad.write_text("not an image")
    with pytest.raises(UnreadableImage, match="not-an-image.png: not a readable image"):
        decode_image(bad, 8, 1)


def test_a_decompression_bomb_is_named_as_unreadable(tmp_path, make_image, monkeypatch):
    bomb = make_image(tmp_path / "bomb.png", size=(16, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 256 pixels: over twice the limit
    with pytest.raises(UnreadableImage, match="bomb.png: not a readable image "
                                              r"\(DecompressionBombError"):
        decode_image(bomb, 8, 1)


def test_scale_for_each_contract():
    pixels = np.array([[0, 51, 255]], dtype=np.uint8)
    np.testing.assert_allclose(scale_for(pixels, PIXELS), [[0, 51, 255]])
    np.testing.assert_allclose(scale_for(pixels, UNIT_FLOAT), [[0, 0.2, 1]])
    with pytest.raises(ValueError, match="unknown input contract"):
        scale_for(pixels, "bgr")


def numbered_images(folder, n):
    """n 8x8 gray PNGs whose every pixel is their number."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(folder / f"{i:03}.png")
        paths.append(folder / f"{i:03}.png")
    return paths


def numbers(dataset):
    return [int(x[0, 0, 0]) for batch, labels in dataset for x in batch.numpy()]


def test_dataset_streams_in_order_or_shuffled_by_seed(tmp_path):
    paths = numbered_images(tmp_path, 20)
    labels = np.arange(20) % 2
    ordered = image_dataset(paths, 8, 1, 6, labels)
    assert numbers(ordered) == list(range(20))
    for batch, y in ordered:
        assert batch.dtype == "uint8"
        np.testing.assert_array_equal(y.numpy(), batch.numpy()[:, 0, 0, 0] % 2)

    first = numbers(image_dataset(paths, 8, 1, 6, labels, shuffle_seed=1))
    again = numbers(image_dataset(paths, 8, 1, 6, labels, shuffle_seed=1))
    assert first == again != list(range(20))
    assert sorted(first) == list(range(20))


def test_dataset_scales_for_a_contract(tmp_path):
    paths = numbered_images(tmp_path, 3)
    (batch,) = image_dataset(paths, 8, 1, 3, contract=UNIT_FLOAT)
    assert batch.dtype == "float32"
    np.testing.assert_allclose(batch.numpy()[:, 0, 0, 0], [0, 1 / 255, 2 / 255])


def test_cache_is_written_once_and_read_back_in_a_random_order(tmp_path):
    paths = numbered_images(tmp_path / "images", 30)
    with claim_cache(tmp_path / "cache") as folder:
        cached = image_dataset(paths, 8, 1, 4, np.arange(30), shuffle_seed=3,
                               shuffle_buffer=2, cache_dir=folder)
        first = numbers(cached)
        assert sorted(first) == list(range(30))
        # put in one random order before caching: even a buffer of 2 is not in file order
        assert sum(b > a for a, b in zip(first, first[1:], strict=False)) < 25
        for path in paths:  # a second pass reads the cache, not the files
            path.unlink()
        assert sorted(numbers(cached)) == list(range(30))
    assert len(list((tmp_path / "cache").glob("images-*.index"))) == 1


def test_a_half_written_cache_is_removed_and_a_held_one_not_used(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    # what a run killed during its first epoch leaves: TensorFlow refuses its lockfile
    (folder / "images-1a_0.lockfile").write_text("Created at: 0")
    (folder / "images-1a_0.data-00000-of-00001.tempstate123").write_bytes(b"partial")
    (folder / "images-2b.index").write_bytes(b"kept")
    (folder / "images-2b.data-00000-of-00001").write_bytes(b"kept")
    with claim_cache(folder) as claimed:
        assert claimed == folder
        assert sorted(p.name for p in folder.iterdir()) == [
            ".claim", "images-2b.data-00000-of-00001", "images-2b.index"]
        with claim_cache(folder) as second:
            assert second is None  # another run holds it: that one trains uncached


def test_predict_files_streams_in_file_order(tmp_path):
    import keras

    paths = numbered_images(tmp_path, 7)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.GlobalAveragePooling2D()])
    outputs = np.concatenate(list(predict_files(model, paths, PIXELS, batch_size=3)))
    np.testing.assert_allclose(outputs[:, 0], np.arange(7))
    legacy = np.concatenate(list(predict_files(model, paths, UNIT_FLOAT, batch_size=3)))
    np.testing.assert_allclose(legacy[:, 0], np.arange(7) / 255, rtol=1e-6)
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    with pytest.raises(UnreadableImage, match="bad.png: not a readable image"):
        list(predict_files(model, [*paths, bad], PIXELS))


def test_caches_of_other_data_versions_are_removed_unless_held(tmp_path):
    old = cache_folder(tmp_path, "old.dir", 8, 1)
    held = cache_folder(tmp_path, "held.dir", 8, 1)
    current = cache_folder(tmp_path, "new.dir", 8, 1)
    assert len({old, held, current}) == 3
    with claim_cache(old):
        (old / "images-1a.index").write_bytes(b"")
    orphan = cache_folder(tmp_path, "orphan.dir", 8, 1)  # its removal killed half-way
    (orphan / "partial").mkdir(parents=True)
    (tmp_path / "not-a-cache").mkdir()
    with claim_cache(held):
        with claim_cache(current) as claimed:
            assert claimed == current
        assert held.is_dir()  # a run is using it
    assert not old.exists() and not orphan.exists()
    assert (tmp_path / "not-a-cache").is_dir()  # only what cache_folder names is pruned
    assert cache_folder(tmp_path, "new.dir", 16, 1) != current  # preprocessing is in the key


def test_decode_converts_rgb_to_one_channel(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    # ITU-R 601-2 luma of pure red: 299/1000 * 255 = 76
    np.testing.assert_array_equal(decode_image(path, 8, 1), 76)


def test_decode_converts_grayscale_to_three_equal_channels(png_file):
    pixels = decode_image(png_file, 12, 3)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])


def test_decode_keeps_pixels_when_size_is_unchanged(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels).save(tmp_path / "ramp.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "ramp.png", 8, 1)[..., 0], pixels)


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
    pixels = decode_image(tmp_path / "deep.png", 16, 1)[..., 0].astype(float)
    np.testing.assert_allclose(pixels, ramp / 257.0, atol=1)
    assert 120 < decode_image(tmp_path / "deep.png", 16, 3).mean() < 135
