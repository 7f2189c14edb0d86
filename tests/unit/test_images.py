import hashlib

import numpy as np
import pytest
from PIL import Image

from visionops.core.images import (
    FACT_COLUMNS,
    class_names,
    facts_table,
    image_facts,
    iter_image_files,
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


def _bits_apart(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def _photo(seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (a blown-up random 8 x 6 colour grid)."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((96, 64), Image.Resampling.BICUBIC)


def test_phash_is_16_hex_digits_that_survive_small_edits(tmp_path):
    from PIL import ImageEnhance

    _photo(0).save(tmp_path / "a.png")
    ImageEnhance.Brightness(_photo(0)).enhance(1.1).save(tmp_path / "b.jpg", quality=80)
    _photo(0).resize((48, 32)).save(tmp_path / "c.png")
    _photo(1).save(tmp_path / "other.png")
    hashes = {name: image_facts(tmp_path, name, "x")["phash"]
              for name in ("a.png", "b.jpg", "c.png", "other.png")}
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes.values())
    assert _bits_apart(hashes["a.png"], hashes["b.jpg"]) <= 4   # brighter, re-encoded
    assert _bits_apart(hashes["a.png"], hashes["c.png"]) <= 4   # half the size
    assert _bits_apart(hashes["a.png"], hashes["other.png"]) > 12


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "I;16"])
def test_phash_of_every_mode(tmp_path, mode):
    image = _photo(2).convert("L") if mode == "I;16" else _photo(2).convert(mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image, dtype=np.uint16) * 256)
    image.save(tmp_path / "m.png")
    facts = image_facts(tmp_path, "m.png", "x")
    assert facts["decodable"] is True
    assert len(facts["phash"]) == 16


def test_no_phash_without_a_decoded_image(tmp_path, png_file):
    (tmp_path / "empty.png").write_bytes(b"")
    assert image_facts(tmp_path, "empty.png", "x")["phash"] is None
    assert image_facts(png_file.parent, png_file.name, "x", max_side=8)["phash"] is None


def test_facts_table_has_the_phash_column(tmp_path, make_image):
    make_image(tmp_path / "a" / "1.png")
    table = facts_table(tmp_path, [("a/1.png", "a")])
    assert list(table.columns) == FACT_COLUMNS and "phash" in FACT_COLUMNS
    assert table.loc[0, "phash"] == image_facts(tmp_path, "a/1.png", "a")["phash"]
