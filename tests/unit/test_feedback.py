"""The review area (visionops.io.feedback) on a local folder: each image is sent once,
ever, so one a reviewer moved away or deleted is not sent again; a landing area holding
review copies and their markers ignores the markers."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from visionops.io.feedback import ReviewArea
from visionops.io.landing import open_landing


def test_an_image_moved_away_or_deleted_by_a_reviewer_is_not_sent_again(tmp_path, make_image):
    area = ReviewArea(str(tmp_path / "review"))
    first = make_image(tmp_path / "in" / "a.png", seed=1).read_bytes()
    second = make_image(tmp_path / "in" / "b.png", seed=2).read_bytes()

    copy = area.add("a.png", first, "3", "PNG")
    other = area.add("b.png", second, "5", "PNG")
    (tmp_path / "landing" / "8").mkdir(parents=True)
    shutil.move(copy, tmp_path / "landing" / "8")  # the reviewer's decisions
    Path(other).unlink()

    assert area.add("a.png", first, "3", "PNG") is None
    assert area.add("renamed.png", first, "7", "PNG") is None  # the content decides
    assert area.add("b.png", second, "5", "PNG") is None
    assert not list((tmp_path / "review").glob("[0-9]/*"))
    markers = sorted(p.name for p in (tmp_path / "review" / ".visionops" / "sent").iterdir())
    assert markers == sorted(hashlib.sha256(c).hexdigest() for c in (first, second))


def test_a_copy_still_under_review_is_neither_overwritten_nor_sent_again(tmp_path, make_image):
    area = ReviewArea(str(tmp_path / "review"))
    content = make_image(tmp_path / "a.png", seed=3).read_bytes()
    copy = area.add("a.png", content, "3", "PNG")

    digest = hashlib.sha256(content).hexdigest()
    assert copy == str(tmp_path / "review" / "3" / f"a-{digest[:12]}.png")
    assert area.add("a.png", content, "3", "PNG") is None
    assert Path(copy).read_bytes() == content


def test_a_landing_area_holding_review_copies_ignores_their_markers(tmp_path, make_image):
    landing = tmp_path / "landing"
    area = ReviewArea(str(landing))  # e.g. the whole review area moved into landing
    area.add("a.png", make_image(tmp_path / "a.png", seed=4).read_bytes(), "3", "PNG")

    assert [file.key for file in open_landing(landing).list()] == [
        f"3/{next((landing / '3').iterdir()).name}"]
