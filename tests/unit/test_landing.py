"""A local landing area read without following links, odd keys named and refused, sizes
capped before reading, markers for every key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from visionops.io.landing import (
    FileChanged,
    FileRefused,
    LandingError,
    LandingFile,
    LocalLanding,
    key_digest,
    key_problem,
    marker_key,
    parse_marker,
)


@pytest.mark.parametrize("key", ["cat//bad.png", "cat/./x.png", "cat\\x.png", "/cat/x.png",
                                 "cat/../x.png", "cat/sub/x.png", "x.png", ".hidden/x.png",
                                 "cat/x\n.png", "cat/" + "x" * 256 + ".png"])
def test_keys_that_are_not_plain_label_slash_file_are_named(key):
    assert key_problem(key)


def test_a_plain_key_has_no_problem_and_markers_round_trip_for_every_key():
    assert key_problem("cat/a photo.png") is None
    for key in ["cat/a photo.png", "cat//bad.png", "a/b/c.png", "stray.png", "cat\\x.png"]:
        file = LandingFile(key, "12-34")
        assert parse_marker(marker_key(file)) == (key, "12-34")
    assert marker_key(LandingFile("cat/x.png", "1-2")) == ".visionops/handled/cat/x.png/1-2.json"


@pytest.fixture
def area(tmp_path, make_image) -> Path:
    root = tmp_path / "landing"
    make_image(root / "cat" / "ok.png")
    make_image(root / "cat" / "sub" / "deep.png", seed=1)
    (root / "notes.txt").write_text("hello")
    outside = tmp_path / "outside"
    make_image(outside / "secret.png", seed=2)
    (root / "cat" / "link.png").symlink_to(outside / "secret.png")
    (root / "dog").symlink_to(outside)
    return root


def test_listing_never_follows_links_and_lists_every_file(area):
    files = {f.key: f for f in LocalLanding(area).list()}

    assert set(files) == {"cat/ok.png", "cat/sub/deep.png", "notes.txt", "cat/link.png", "dog"}
    assert "symbolic link" in files["cat/link.png"].problem
    assert "symbolic link" in files["dog"].problem, "a linked label folder is one refused entry"
    assert files["cat/ok.png"].problem is None and files["cat/ok.png"].size > 0


def test_fetch_refuses_a_label_folder_swapped_for_a_link_after_listing(area, tmp_path):
    landing = LocalLanding(area)
    listed = {f.key: f for f in landing.list()}["cat/ok.png"]
    real = area / "cat"
    real.rename(tmp_path / "moved")
    (area / "cat").symlink_to(tmp_path / "moved")

    with pytest.raises(FileRefused, match="without following a link"):
        landing.fetch(listed, tmp_path / "copy.png", max_bytes=10**6)
    assert not (tmp_path / "copy.png").exists()


def test_fetch_writes_a_private_copy_and_refuses_a_file_grown_or_changed(area, tmp_path):
    landing = LocalLanding(area)
    listed = {f.key: f for f in landing.list()}["cat/ok.png"]

    landing.fetch(listed, tmp_path / "copy.png", max_bytes=10**6)
    assert stat.S_IMODE((tmp_path / "copy.png").stat().st_mode) == 0o600
    with pytest.raises(FileRefused, match=f"{listed.size} bytes, more than .* 10"):
        landing.fetch(listed, tmp_path / "small.png", max_bytes=10)
    os.utime(area / "cat" / "ok.png", ns=(1, 1))
    with pytest.raises(FileChanged):
        landing.fetch(listed, tmp_path / "again.png", max_bytes=10**6)


def test_a_linked_own_folder_is_refused_with_its_path(area, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (area / ".visionops").symlink_to(elsewhere)

    with pytest.raises(LandingError, match=r"\.visionops: is a symbolic link"):
        LocalLanding(area).list()


def test_markers_are_never_written_through_a_linked_folder(area, tmp_path):
    landing = LocalLanding(area)
    (area / ".visionops" / "handled").mkdir(parents=True)
    (area / ".visionops" / "handled" / "cat").symlink_to(tmp_path)
    file = {f.key: f for f in landing.list()}["cat/ok.png"]

    with pytest.raises(LandingError, match="symbolic link"):
        landing.mark(file, {"status": "accepted"})
    assert not list(tmp_path.glob("ok.png"))


def test_a_marker_path_too_long_for_a_name_or_an_s3_key_is_named_by_the_keys_sha256():
    long_plain = LandingFile("cat/" + "a" * 250 + ".png", "0" * 32)
    assert marker_key(long_plain) == f".visionops/handled/{long_plain.key}/{'0' * 32}.json"
    under_a_long_prefix = marker_key(long_plain, room=1024 - 800)  # S3: prefix of 800 bytes
    assert under_a_long_prefix == (f".visionops/handled/.sha256/{key_digest(long_plain.key)}/"
                                   f"{'0' * 32}.json")
    refused = LandingFile("cat/" + "b" * 300 + ".png", "1-2")  # percent-encoded: 310 bytes
    assert marker_key(refused) == f".visionops/handled/.sha256/{key_digest(refused.key)}/1-2.json"
    assert parse_marker(marker_key(refused)) is None, "its record names the key"


def test_markers_of_long_keys_are_found_by_the_key_their_record_names(tmp_path, make_image):
    root = tmp_path / "landing"
    make_image(root / "cat" / ("d" * 200) / ("e" * 200 + ".png"))
    landing = LocalLanding(root)
    (nested,) = landing.list()

    landing.mark(nested, {"status": "quarantined", "reasons": ["nested"]})

    assert landing.handled() == {(nested.key, nested.fingerprint)}
    assert landing.markers()[(nested.key, nested.fingerprint)]["reasons"] == ["nested"]
    forged = root / ".visionops" / "handled" / ".sha256" / key_digest("cat/x.png") / "1-2.json"
    forged.parent.mkdir(parents=True)
    forged.write_text('{"key": "cat/y.png", "status": "accepted"}')
    assert landing.handled() == {(nested.key, nested.fingerprint)}, \
        "a record naming a key that does not hash to its folder is ignored"
