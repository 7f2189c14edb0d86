"""The benchmark's photo generator: layout, determinism, and EXIF-rotated files."""

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageOps

from benchmarks.photos import make_photos


def pixels(path, upright=False):
    with Image.open(path) as image:
        if upright:
            image = ImageOps.exif_transpose(image)
        return np.asarray(image, dtype=np.int16)


def orientation(path):
    with Image.open(path) as image:
        return image.getexif().get(ExifTags.Base.Orientation)


def test_photos_are_rgb_jpegs_one_folder_per_class(tmp_path):
    paths = make_photos(tmp_path, 12, n_classes=5, size=48, seed=3)
    assert len(paths) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"class_{k:02d}" for k in range(5)]
    for index, path in enumerate(paths):
        assert path.parent == tmp_path / f"class_{index % 5:02d}"
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))
        assert orientation(path) is None
    assert len({p.read_bytes() for p in paths}) == 12


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first = make_photos(tmp_path / "a", 6, n_classes=3, size=32, seed=1)
    again = make_photos(tmp_path / "b", 6, n_classes=3, size=32, seed=1, workers=2)
    other = make_photos(tmp_path / "c", 6, n_classes=3, size=32, seed=2)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert all(p.read_bytes() != q.read_bytes() for p, q in zip(first, other, strict=True))


def test_classes_differ_more_than_images_of_one_class(tmp_path):
    paths = make_photos(tmp_path, 200, n_classes=2, size=32, seed=0)
    # class 0 is red-ish and disc-shaped, class 1 cyan-ish squares: the red-minus-blue
    # balance of the most saturated pixels tells them apart on average
    def redness(path):
        rgb = pixels(path).reshape(-1, 3)
        vivid = rgb[np.ptp(rgb, axis=1) > 100]
        return float(np.mean(vivid[:, 0] - vivid[:, 2])) if len(vivid) else 0.0
    scores = np.array([redness(p) for p in paths])
    assert scores[0::2].mean() > scores[1::2].mean() + 50


def test_exif_rotated_files_turn_back_to_the_upright_picture(tmp_path):
    upright = make_photos(tmp_path / "upright", 16, n_classes=4, size=64, seed=5)
    rotated = make_photos(tmp_path / "rotated", 16, n_classes=4, size=64, seed=5,
                          exif_rotated_fraction=1.0)
    assert {orientation(p) for p in rotated} == {3, 6, 8}
    for straight, turned in zip(upright, rotated, strict=True):
        expected = pixels(straight)
        assert np.abs(pixels(turned) - expected).mean() > 10  # stored turned
        assert np.abs(pixels(turned, upright=True) - expected).mean() < 4  # JPEG noise only


def test_a_fraction_of_files_is_rotated(tmp_path):
    paths = make_photos(tmp_path, 100, n_classes=2, size=16, seed=0,
                        exif_rotated_fraction=0.3)
    tagged = sum(orientation(p) is not None for p in paths)
    assert 15 <= tagged <= 45
    with pytest.raises(ValueError, match="fraction"):
        make_photos(tmp_path, 1, exif_rotated_fraction=1.5)
