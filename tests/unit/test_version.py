import hashlib
import shutil
import threading
import time

import pytest
import yaml
from dvc.repo import Repo

from visionops.io import dataset
from visionops.io.dataset import (
    content_hash,
    in_cache,
    pull_dataset,
    recorded_files,
    sync_dataset,
    version_dataset,
)

REMOTE_CONFIG = """[core]
    no_scm = True
    remote = local
['remote "local"']
    url = ../remote
"""


@pytest.fixture
def dvc_repo(tmp_path, tiny_digits):
    """tmp_path as a DVC repo (no git) holding data/ and a local remote in remote/."""
    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / ".dvc" / "config").write_text(REMOTE_CONFIG)
    return tmp_path


def object_path(store, md5):
    return store / "files" / "md5" / md5[:2] / md5[2:]


def test_version_dataset_adds_and_pushes(dvc_repo):
    version = version_dataset(dvc_repo / "data")
    assert version.dvc_file == "data.dvc"
    assert version.pushed_to == "local"
    out = yaml.safe_load((dvc_repo / "data.dvc").read_text())["outs"][0]
    assert version.md5 == out["md5"]
    assert version.md5.endswith(".dir")
    assert out["nfiles"] == 18
    assert object_path(dvc_repo / "remote", version.md5).is_file()
    an_image = next((dvc_repo / "data" / "1").iterdir())
    image_md5 = hashlib.md5(an_image.read_bytes()).hexdigest()
    assert object_path(dvc_repo / "remote", image_md5).is_file()


def test_unchanged_data_keeps_its_version(dvc_repo):
    first = version_dataset(dvc_repo / "data")
    assert version_dataset(dvc_repo / "data").md5 == first.md5


def test_changed_data_gets_a_new_version_and_the_old_one_is_kept(dvc_repo):
    data = dvc_repo / "data"
    old = version_dataset(data)
    removed = next((data / "2").iterdir())
    removed_md5 = hashlib.md5(removed.read_bytes()).hexdigest()
    removed.unlink()
    new = version_dataset(data)
    assert new.md5 != old.md5
    assert yaml.safe_load((dvc_repo / "data.dvc").read_text())["outs"][0]["md5"] == new.md5
    for store in (dvc_repo / "remote", dvc_repo / ".dvc" / "cache"):
        assert object_path(store, old.md5).is_file()
        assert object_path(store, new.md5).is_file()
        assert object_path(store, removed_md5).is_file()


def test_old_version_can_be_checked_out_again(dvc_repo):
    data = dvc_repo / "data"
    old = version_dataset(data)
    old_dvc_file = (dvc_repo / "data.dvc").read_text()
    (data / "0" / "digit_0000.png").write_bytes(b"changed")
    assert version_dataset(data).md5 != old.md5
    (dvc_repo / "data.dvc").write_text(old_dvc_file)
    with Repo(str(dvc_repo)) as repo:
        repo.checkout(force=True)
    assert content_hash(data) == old.md5


def test_no_push_when_asked(dvc_repo):
    version = version_dataset(dvc_repo / "data", push=False)
    assert version.pushed_to is None
    assert not (dvc_repo / "remote").exists()
    assert object_path(dvc_repo / ".dvc" / "cache", version.md5).is_file()


def test_repo_without_remote_is_versioned_but_not_pushed(dvc_repo):
    (dvc_repo / ".dvc" / "config").write_text("[core]\n    no_scm = True\n")
    version = version_dataset(dvc_repo / "data")
    assert version.dvc_file == "data.dvc"
    assert version.pushed_to is None


def test_folder_outside_dvc_gets_the_md5_dvc_add_would_record(dvc_repo, tmp_path_factory):
    outside = tmp_path_factory.mktemp("plain") / "data"
    shutil.copytree(dvc_repo / "data", outside)
    version = version_dataset(outside)
    assert version.dvc_file is None
    assert version.pushed_to is None
    assert not outside.with_name("data.dvc").exists()
    assert version.md5 == version_dataset(dvc_repo / "data").md5
    assert content_hash(outside) == version.md5


def test_a_stale_folder_is_checked_out_to_the_recorded_version(dvc_repo):
    """A worker whose data/ holds an older version than data.dvc (another worker recorded
    a newer one) trains on the recorded version, not on what it has."""
    data = dvc_repo / "data"
    old = version_dataset(data)
    (data / "2" / "new.png").write_bytes((data / "1" / "digit_0001.png").read_bytes())
    removed = next((data / "0").iterdir())
    removed.unlink()
    new = version_dataset(data)
    newer_dvc_file = (dvc_repo / "data.dvc").read_text()
    (dvc_repo / "data.dvc").write_text(newer_dvc_file.replace(new.md5, old.md5))
    with Repo(str(dvc_repo)) as repo:
        repo.checkout(force=True)
    assert content_hash(data) == old.md5 and removed.exists()
    (dvc_repo / "data.dvc").write_text(newer_dvc_file)

    assert sync_dataset(data) == "checked out"
    assert content_hash(data) == new.md5
    assert (data / "2" / "new.png").is_file() and not removed.exists()
    assert sync_dataset(data) == "in sync"


def test_a_version_missing_from_the_cache_is_pulled(dvc_repo):
    data = dvc_repo / "data"
    version = version_dataset(data)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    (data / "1" / "digit_0001.png").write_bytes(b"stale")
    with Repo(str(dvc_repo)) as repo:  # the stale content is a version this repo had
        repo.add(str(data))
    (dvc_repo / "data.dvc").write_text(
        yaml.safe_dump({"outs": [{"md5": version.md5, "path": "data", "hash": "md5"}]}))
    assert sync_dataset(data) == "pulled"
    assert content_hash(data) == version.md5
    shutil.rmtree(data)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")  # a fresh clone: neither data/ nor a cache
    assert sync_dataset(data) == "pulled"
    assert content_hash(data) == version.md5


def test_images_changed_by_hand_are_kept_for_dvc_add(dvc_repo):
    """Content no version ever had is new data, not a stale copy: it is not thrown away."""
    data = dvc_repo / "data"
    version = version_dataset(data)
    (data / "0" / "by-hand.png").write_bytes((data / "1" / "digit_0001.png").read_bytes())
    assert sync_dataset(data) == "modified"
    assert (data / "0" / "by-hand.png").is_file()
    assert content_hash(data) != version.md5


def test_sync_names_a_broken_dvc_file(dvc_repo):
    version_dataset(dvc_repo / "data")
    (dvc_repo / "data.dvc").write_text("outs: []\n")
    with pytest.raises(ValueError, match="data.dvc: not a DVC file"):
        sync_dataset(dvc_repo / "data")
    assert sync_dataset(dvc_repo / "elsewhere") == "untracked"


def test_dvc_operations_wait_for_the_lock_another_dvc_command_holds(dvc_repo):
    """DVC gives up on its lock after 3 s; a run overlapping another one waits instead."""
    version_dataset(dvc_repo / "data")
    (dvc_repo / "data" / "0" / "digit_0000.png").unlink()
    held, hold_s = threading.Event(), 4.0

    def other_dvc_command():
        with Repo(str(dvc_repo)) as repo, repo.lock:
            held.set()
            time.sleep(hold_s)

    other = threading.Thread(target=other_dvc_command)
    other.start()
    assert held.wait(30)
    started = time.monotonic()
    try:
        version = version_dataset(dvc_repo / "data")
    finally:
        other.join()
    assert time.monotonic() - started > hold_s - 1
    assert version.md5 == content_hash(dvc_repo / "data")
    assert pull_dataset(dvc_repo / "data") == (dvc_repo / "data").resolve()


def test_the_dvc_internals_used_here_still_exist():
    """visionops.io.dataset uses these dvc-data / dvc-objects internals (DVC has no public
    API for them); an upgrade that moves one fails here, by name."""
    from importlib import metadata

    found = {name: metadata.version(name) for name in dataset.DVC_INTERNALS_MAJORS}
    assert dataset.dvc_internals_supported(), (
        f"{found}: not the majors {dataset.DVC_INTERNALS_MAJORS} visionops.io.dataset was "
        "tested with; it now hashes with DVC's documented formats. Check the names below "
        "still exist and work, then update DVC_INTERNALS_MAJORS.")
    try:
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.db import HashFileDB
        from dvc_objects.fs import LocalFileSystem, MemoryFileSystem
    except ImportError as exc:
        pytest.fail(f"{found}: {exc}. visionops.io.dataset._content_hash_by_dvc_data uses "
                    "dvc_data.hashfile.build.build, dvc_data.hashfile.db.HashFileDB and "
                    "dvc_objects.fs.LocalFileSystem/MemoryFileSystem; narrow "
                    "DVC_INTERNALS_MAJORS or follow where they moved.")
    try:
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree
    except ImportError as exc:
        pytest.fail(f"{found}: {exc}. visionops.io.dataset._listing_by_dvc_data uses "
                    "dvc_data.hashfile.tree.Tree.load and dvc_data.hashfile.hash_info."
                    "HashInfo; narrow DVC_INTERNALS_MAJORS or follow where they moved.")
    assert callable(build) and LocalFileSystem and MemoryFileSystem and HashInfo
    assert callable(Tree.load), "_listing_by_dvc_data uses Tree.load"
    assert callable(HashFileDB.exists), "in_cache uses repo.cache.local.exists (HashFileDB)"


def test_the_documented_formats_give_what_dvc_records(dvc_repo, monkeypatch):
    """The fallback for other dvc-data majors: the same md5 as `dvc add`, nested folders
    and names outside ASCII included, the same answer on what the cache holds, and the
    same listing (through dvc.api)."""
    data = dvc_repo / "data"
    (data / "2" / "deeper" / "é ü.png").parent.mkdir()
    (data / "2" / "deeper" / "é ü.png").write_bytes(b"not ascii")
    (data / "empty").mkdir()
    version = version_dataset(data, push=False)
    listed = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    copy = shutil.copytree(data, dvc_repo / "copy")
    (data / "0" / "not-added.png").write_bytes(b"in the folder, not in the version")

    def answers():
        with Repo(str(dvc_repo)) as repo:
            return (content_hash(copy), content_hash(data), in_cache(repo, version.md5),
                    in_cache(repo, content_hash(data)), recorded_files(data))

    by_dvc_data = answers()
    monkeypatch.setattr(dataset, "dvc_internals_supported", lambda: False)
    assert answers() == by_dvc_data
    assert by_dvc_data[0] == version.md5 != by_dvc_data[1]
    assert by_dvc_data[2:] == (True, False, listed)


def test_recorded_files_are_the_version_data_dvc_names(dvc_repo):
    data = dvc_repo / "data"
    assert recorded_files(data) is None  # not tracked yet
    version_dataset(data, push=False)
    tracked = {p.relative_to(data).as_posix() for p in data.rglob("*.png")}
    (data / "0" / "not-added.png").write_bytes(b"new")
    (data / "1" / "digit_0001.png").unlink()
    assert recorded_files(data) == tracked
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    assert recorded_files(data) is None  # the listing is not here: callers look at data/
