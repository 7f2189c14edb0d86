import hashlib

import numpy as np
import pytest
from PIL import Image

from visionops.core.images import (
    class_names,
    image_facts,
    iter_image_files,
    load_image,
    load_images,
)


def test_facts_of_a_good_png(png_file):
    facts = image_facts(png_file.parent, png_file.name, "digits")
    assert facts["path"] == "good.png"
    assert facts["label"] == "digits"
    assert (facts["format"], facts["width"], facts["height"], facts["mode"]) == ("PNG", 20, 12, "L")
    assert facts["sha256"] == hashlib.sha256(png_file.read_bytes()).hexdigest()
    assert facts["bytes"] == png_file.stat().st_size
    assert facts["decodable"] is True
    assert facts["error"] is None


def test_facts_of_a_jpeg(tmp_path, make_image):
    path = make_image(tmp_path / "photo.jpg", size=(10, 30), mode="RGB", fmt="JPEG")
    facts = image_facts(tmp_path, "photo.jpg", "x")
    assert (facts["format"], facts["width"], facts["height"], facts["mode"]) == ("JPEG", 10, 30,
                                                                                 "RGB")
    assert facts["decodable"] is True
    assert path.exists()


def test_facts_of_a_truncated_png(png_file):
    png_file.write_bytes(png_file.read_bytes()[:-40])
    facts = image_facts(png_file.parent, png_file.name, "x")
    assert facts["format"] == "PNG"  # the header is still readable
    assert facts["decodable"] is False
    assert facts["error"]


def test_facts_of_a_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    facts = image_facts(tmp_path, "empty.png", "x")
    assert facts["bytes"] == 0
    assert facts["sha256"] == hashlib.sha256(b"").hexdigest()
    assert facts["decodable"] is False
    assert facts["format"] is None
    assert "UnidentifiedImageError" in facts["error"]


def test_facts_of_a_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not an image at all")
    facts = image_facts(tmp_path, "notes.png", "x")
    assert facts["decodable"] is False
    assert facts["format"] is None
    assert facts["error"]


def test_load_image_shape_dtype_and_range(png_file):
    array = load_image(png_file, image_size=28, channels=1)
    assert array.shape == (28, 28, 1)
    assert array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 1.0
    assert array.max() > 0.5  # scaled, not left at 0..255 and not all black


def test_load_image_converts_rgb_to_one_channel(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    array = load_image(path, image_size=8, channels=1)
    assert array.shape == (8, 8, 1)
    # ITU-R 601-2 luma of pure red: 299/1000 * 255 = 76
    np.testing.assert_allclose(array, 76 / 255, atol=1e-6)


def test_load_image_converts_grayscale_to_three_channels(png_file):
    array = load_image(png_file, image_size=12, channels=3)
    assert array.shape == (12, 12, 3)
    np.testing.assert_array_equal(array[..., 0], array[..., 1])
    np.testing.assert_array_equal(array[..., 0], array[..., 2])


def test_load_image_keeps_pixels_when_size_is_unchanged(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels).save(tmp_path / "ramp.png")
    array = load_image(tmp_path / "ramp.png", image_size=8, channels=1)
    np.testing.assert_allclose(array[..., 0], pixels / 255.0, atol=1e-6)


def test_load_images_stacks_and_handles_empty(png_file):
    assert load_images([png_file, png_file], 16, 1).shape == (2, 16, 16, 1)
    empty = load_images([], 16, 3)
    assert empty.shape == (0, 16, 16, 3)
    assert empty.dtype == np.float32


def test_iter_image_files_is_sorted_and_skips_non_images(tmp_path, make_image):
    for name in ("b/2.png", "b/1.JPG", "a/z.jpeg", "a/sub/deep.png"):
        make_image(tmp_path / name)
    (tmp_path / "a" / "readme.txt").write_text("hi")
    (tmp_path / "a" / "photo.gif").write_bytes(b"GIF89a")
    make_image(tmp_path / ".hidden" / "x.png")
    (tmp_path / "loose.png").write_bytes(b"")  # not in a class folder
    assert list(iter_image_files(tmp_path)) == [
        ("a/sub/deep.png", "a"), ("a/z.jpeg", "a"), ("b/1.JPG", "b"), ("b/2.png", "b"),
    ]


def test_class_names_sorted_and_includes_empty_folders(tmp_path):
    for name in ("zeta", "alpha", "empty", ".git"):
        (tmp_path / name).mkdir()
    assert class_names(tmp_path) == ["alpha", "empty", "zeta"]


@pytest.mark.parametrize("name", ["with space.png", "ünïcødé_数字.png"])
def test_unusual_file_names(tmp_path, make_image, name):
    make_image(tmp_path / "lbl" / name)
    assert list(iter_image_files(tmp_path)) == [(f"lbl/{name}", "lbl")]
    assert image_facts(tmp_path, f"lbl/{name}", "lbl")["decodable"] is True
