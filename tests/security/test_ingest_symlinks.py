"""Ingest never follows a symbolic link, in the landing area or in the project, and
refuses a file too large before reading it. Each attack the security read reproduced is
one test: a link to an image or to a text secret outside the landing area, a linked
class folder or subfolder, a linked `.visionops/` (the landing area's or the project's),
a linked data/, data/<label>/ or quarantine/."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from projects import digits

from visionops.core.config import load_params
from visionops.io.ingest import ingest as run_ingest
from visionops.io.ingest import landing_states, refusal
from visionops.io.landing import FileRefused, LandingError, LocalLanding, S3Landing

SECRET = b"AWS_SECRET_ACCESS_KEY=do-not-leak-4f1c2e\n"


def ingest(landing: Path, params):
    return run_ingest(str(landing), params, push=False)


def files_under(*folders: Path) -> list[Path]:
    """Every regular file under the folders, never through a link."""
    found = []
    for folder in folders:
        for parent, _, names in os.walk(folder):
            found += [Path(parent) / name for name in names
                      if not (Path(parent) / name).is_symlink()]
    return found


def holding(content: bytes, *folders: Path) -> list[Path]:
    return [path for path in files_under(*folders) if content in path.read_bytes()]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `folder` with its mode and size: what a write elsewhere changes."""
    entries = {".": (folder.lstat().st_mode, 0)}
    for path in folder.rglob("*"):
        info = path.lstat()
        entries[path.relative_to(folder).as_posix()] = (info.st_mode, info.st_size)
    return entries


@pytest.fixture
def params(project):
    return load_params(project / "params.yaml")


@pytest.fixture
def landing(tmp_path) -> Path:
    """Three new valid digits of class 1: they pass once nothing else blocks the batch."""
    return digits(tmp_path / "landing", label=1, first=25, count=3)


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A folder outside the project and the landing area that nothing may write to."""
    folder = tmp_path / "elsewhere"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    (folder / "keep.txt").write_text("untouched")
    return folder


def test_a_link_to_an_image_outside_is_quarantined_unread_and_never_versioned(
        project, params, landing, tmp_path):
    outside = digits(tmp_path / "outside", label=1, first=40, count=1)
    private = next((outside / "1").iterdir())
    (landing / "1" / "link.png").symlink_to(private)

    first = ingest(landing, params)

    assert list(first.quarantined) == ["1/link.png"]
    (reason,) = first.quarantined["1/link.png"]
    assert f"a symbolic link (to {private})" in reason and "never followed" in reason
    assert not first.accepted and len(first.pending) == 3, "the batch waits, nothing lost"
    assert not holding(private.read_bytes(), project, landing / ".visionops")
    quarantine = Path(first.quarantine_dir)
    assert "symbolic link" in (quarantine / "1" / "link.png.reason.txt").read_text()
    assert not (quarantine / "1" / "link.png").exists()

    second = ingest(landing, params)

    assert len(second.accepted) == 3 and not second.quarantined and not second.pending
    assert not holding(private.read_bytes(), project), "never in data/, the cache or remote"
    states = landing_states(str(landing), params)
    assert states.pop("1/link.png") == "quarantined"
    assert set(states.values()) == {"accepted"}


@pytest.mark.parametrize("name", ["token.png", "token.txt"])
def test_a_link_to_a_text_secret_is_never_copied_nor_readable_by_others(
        project, params, landing, tmp_path, name):
    secret = tmp_path / "home" / ".aws-credentials"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    (landing / "1" / name).symlink_to(secret)

    result = ingest(landing, params)

    assert f"1/{name}" in result.quarantined
    assert "symbolic link" in result.quarantined[f"1/{name}"][0]
    assert not holding(SECRET, project, landing / ".visionops", Path(result.quarantine_dir))
    quarantine = project / params.ingest.quarantine_dir
    for path in files_under(quarantine):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path} readable by others"
    assert stat.S_IMODE(quarantine.stat().st_mode) == 0o700


def test_a_linked_class_folder_and_a_linked_subfolder_are_refused_entries(
        project, params, landing, tmp_path):
    outside = digits(tmp_path / "outside", label=5, first=0, count=6)
    (landing / "5").symlink_to(outside / "5")
    (landing / "1" / "more").symlink_to(outside / "5")

    result = ingest(landing, params)

    assert sorted(result.quarantined) == ["1/more", "5"]
    assert all("symbolic link" in reasons[0] for reasons in result.quarantined.values())
    assert not (project / "data" / "5").exists()
    for image in (outside / "5").iterdir():
        assert not holding(image.read_bytes(), project)


def test_a_linked_landing_own_folder_is_refused_and_nothing_is_written_through_it(
        project, params, landing, elsewhere):
    (landing / ".visionops").symlink_to(elsewhere)
    before = tree(elsewhere)

    with pytest.raises(LandingError, match=rf"{landing}/\.visionops: is a symbolic link"):
        ingest(landing, params)

    assert tree(elsewhere) == before
    assert len(list((project / "data" / "1").iterdir())) == 25, "data/ unchanged"


def test_a_linked_marker_folder_leaves_its_files_pending_and_writes_nothing_there(
        project, params, landing, elsewhere):
    (landing / ".visionops" / "handled").mkdir(parents=True)
    (landing / ".visionops" / "handled" / "1").symlink_to(elsewhere)
    before = tree(elsewhere)

    result = ingest(landing, params)

    assert tree(elsewhere) == before
    assert sorted(result.pending) == sorted(f"1/{p.name}" for p in (landing / "1").iterdir())
    for reason in result.pending.values():
        assert f"{landing}/.visionops/handled/1: is a symbolic link" in reason
    assert set(landing_states(str(landing), params).values()) == {"pending"}, "none lost"


@pytest.mark.parametrize("linked", [".visionops", ".visionops/staging", "data", "data/1",
                                    "quarantine"])
def test_a_linked_project_folder_is_refused_before_anything_is_read_or_written(
        project, params, landing, elsewhere, linked):
    (landing / "1" / "broken.png").write_bytes(b"not an image")  # needs the quarantine
    folder = project / linked
    if folder.exists():
        shutil.copytree(folder, elsewhere / "moved")
        shutil.rmtree(folder)
        (elsewhere / "moved" / "keep.txt").write_text("untouched")
        elsewhere = elsewhere / "moved"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(elsewhere)
    before = tree(elsewhere)

    with pytest.raises(LandingError, match=rf"{folder}: is a symbolic link"):
        ingest(landing, params)

    assert tree(elsewhere) == before
    assert not (landing / ".visionops").exists(), "no landing file marked"


def test_a_file_too_large_is_refused_by_its_size_before_it_is_read(
        project, params, landing, tmp_path):
    huge = landing / "1" / "huge.png"
    with open(huge, "wb") as sparse:
        sparse.truncate(10**12)  # reading it would take hours
    small = load_params(project / "params.yaml", validation__max_bytes=100_000)
    started = time.monotonic()

    result = ingest(landing, small)

    assert time.monotonic() - started < 60
    assert result.quarantined["1/huge.png"] == [
        "1000000000000 bytes, more than validation.max_bytes 100000"]
    assert not (Path(result.quarantine_dir) / "1" / "huge.png").exists()

    area = LocalLanding(landing)
    listed = {file.key: file for file in area.list()}["1/huge.png"]
    target = tmp_path / "staged.png"
    with pytest.raises(FileRefused, match="1000000000000 bytes, more than .* 100000"):
        area.fetch(listed, target, max_bytes=100_000)
    assert not target.exists(), "refused before a byte was read"


@pytest.fixture
def object_store(tmp_path):
    from visionops.ops.objectstore import start_seaweedfs

    store = start_seaweedfs(tmp_path / "seaweedfs", "visionops-test", "visionops-test-secret")
    yield store
    store.stop()


def test_an_s3_object_too_large_is_refused_by_its_listed_size_never_downloaded(
        object_store, tmp_path):
    client = object_store.client()
    client.create_bucket(Bucket="landing")
    client.put_object(Bucket="landing", Key="in/1/big.png", Body=os.urandom(1500))
    client.put_object(Bucket="landing", Key="in/1/small.png", Body=os.urandom(500))
    downloads = []
    client.meta.events.register("provide-client-params.s3.GetObject",
                                lambda params, **_: downloads.append(params["Key"]))
    area = S3Landing("s3://landing/in", client=client)
    listed = {file.key: file for file in area.list()}

    assert refusal(listed["1/big.png"], 1000) == ("1500 bytes, more than "
                                                  "validation.max_bytes 1000")
    with pytest.raises(FileRefused, match="1500 bytes, more than validation.max_bytes 1000"):
        area.fetch(listed["1/big.png"], tmp_path / "big.png", max_bytes=1000)
    assert downloads == [] and not (tmp_path / "big.png").exists()
    area.fetch(listed["1/small.png"], tmp_path / "small.png", max_bytes=1000)
    assert downloads == ["in/1/small.png"], "the hook sees every download"
