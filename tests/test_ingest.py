"""Ingest from a landing area into a DVC-versioned dataset, locally and from a real
S3-compatible server (SeaweedFS)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from visionops.core.config import load_params
from visionops.core.demo import write_digits
from visionops.io.ingest import ingest


def data_md5(project: Path) -> str:
    return yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if ".visionops" not in p.parts)


def new_digits(folder: Path, skip_per_class: int = 25, per_class: int = 30) -> Path:
    """Digits the tiny project does not have yet: the 26th to 30th of each class 0-3."""
    write_digits(folder, per_class=per_class, labels=range(4))
    for label in folder.iterdir():
        for old in sorted(label.iterdir())[:skip_per_class]:
            old.unlink()
    return folder


@pytest.fixture
def versioned(project: Path) -> Path:
    from visionops.io.dataset import version_dataset

    version_dataset(project / "data")
    return project


def test_new_images_are_added_versioned_pushed_and_marked(versioned, tmp_path):
    landing = new_digits(tmp_path / "landing")
    params = load_params(versioned / "params.yaml")
    before = data_md5(versioned)

    result = ingest(str(landing), params)

    assert len(result.accepted) == 20 and not result.quarantined
    assert len(images_in(versioned / "data")) == 120
    assert data_md5(versioned) == result.data_version != before
    markers = list((landing / ".visionops" / "handled").rglob("*.json"))
    assert len(markers) == 20
    assert len(images_in(landing)) == 20, "landing files are kept"

    again = ingest(str(landing), params)
    assert (again.accepted, again.already_present, again.quarantined) == ([], [], {})
    assert data_md5(versioned) == result.data_version


def test_same_content_again_is_a_no_op(versioned, tmp_path):
    landing = tmp_path / "landing" / "2"
    landing.mkdir(parents=True)
    original = sorted((versioned / "data" / "2").iterdir())[0]
    shutil.copy(original, landing / "renamed copy.png")
    before = data_md5(versioned)

    result = ingest(str(landing.parent), load_params(versioned / "params.yaml"))

    assert result.already_present == ["2/renamed copy.png"] and not result.accepted
    assert len(images_in(versioned / "data")) == 100
    assert data_md5(versioned) == before


def test_batch_with_a_defect_is_quarantined_and_the_dataset_unchanged(versioned, tmp_path):
    landing = new_digits(tmp_path / "landing")
    broken = landing / "1" / "broken.png"
    broken.write_bytes(sorted((landing / "1").iterdir())[0].read_bytes()[:30])
    conflict = landing / "3" / "also a zero.png"
    shutil.copy(sorted((versioned / "data" / "0").iterdir())[0], conflict)
    params = load_params(versioned / "params.yaml")
    before, count = data_md5(versioned), len(images_in(versioned / "data"))

    result = ingest(str(landing), params)

    assert not result.accepted and sorted(result.quarantined) == ["1/broken.png",
                                                                  "3/also a zero.png"]
    assert data_md5(versioned) == before and len(images_in(versioned / "data")) == count
    quarantine = Path(result.quarantine_dir)
    assert len(images_in(quarantine)) == 2
    assert "decodable" in (quarantine / "1" / "broken.png.reason.txt").read_text()
    assert "label conflict" in (quarantine / "3" / "also a zero.png.reason.txt").read_text()
    assert len(result.pending) == 20, "the innocent files wait for the next run"
    assert all("because of other files" in reason for reason in result.pending.values())
    assert broken.exists() and conflict.exists(), "landing files are never deleted"

    retry = ingest(str(landing), params)  # the defective files stay handled
    assert len(retry.accepted) == 20 and not retry.quarantined
    assert len(images_in(versioned / "data")) == count + 20


def _ingest_process(project: Path, landing: Path) -> subprocess.Popen:
    visionops = Path(sys.executable).with_name("visionops")
    return subprocess.Popen([str(visionops), "ingest", str(landing), "--params",
                             str(project / "params.yaml")], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_ingest_loses_nothing_and_counts_nothing_twice(versioned, tmp_path):
    landing = new_digits(tmp_path / "landing", per_class=75)  # 50 new per class
    params = load_params(versioned / "params.yaml")
    for delay in (1.0, 2.5, 3.5, 4.5, 6.0):
        process = _ingest_process(versioned, landing)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()

    final = ingest(str(landing), params)

    data_images = images_in(versioned / "data")
    assert len(data_images) == 100 + 200
    assert not list((versioned / "data").rglob("*.partial"))
    assert len({p.read_bytes() for p in data_images}) == 300, "no content counted twice"
    assert final.data_version in (None, data_md5(versioned))
    from visionops.io.dataset import content_hash

    assert content_hash(versioned / "data") == data_md5(versioned)
    assert len(list((landing / ".visionops" / "handled").rglob("*.json"))) == 200
    status = subprocess.run([str(Path(sys.executable).with_name("dvc")), "status", "-c"],
                            cwd=versioned, capture_output=True, text=True)
    assert status.returncode == 0 and "new:" not in status.stdout, status.stdout


@pytest.fixture(scope="module")
def object_store(tmp_path_factory):
    from visionops.ops.objectstore import start_seaweedfs

    store = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), "visionops-test",
                            "visionops-test-secret")
    yield store
    store.stop()


def test_ingest_from_s3_with_credentials_from_the_environment(versioned, tmp_path,
                                                               object_store, monkeypatch):
    client = object_store.client()
    client.create_bucket(Bucket="landing")
    for image in images_in(new_digits(tmp_path / "source")):
        client.upload_file(str(image), "landing",
                           f"incoming/{image.parent.name}/{image.name}")
    for key, value in object_store.env().items():
        monkeypatch.setenv(key, value)

    result = ingest("s3://landing/incoming", load_params(versioned / "params.yaml"))

    assert len(result.accepted) == 20
    assert len(images_in(versioned / "data")) == 120
    markers = client.list_objects_v2(Bucket="landing", Prefix="incoming/.visionops/")
    assert markers["KeyCount"] == 20
    listed = client.list_objects_v2(Bucket="landing", Prefix="incoming/")["KeyCount"]
    assert listed == 40, "landing objects are kept beside their markers"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError):
        ingest("s3://landing/incoming", load_params(versioned / "params.yaml"))
    assert os.environ["AWS_ENDPOINT_URL"] == object_store.endpoint


def test_two_ingests_at_once_are_serialised_and_mark_only_what_they_copied(versioned,
                                                                            tmp_path):
    from visionops.io.ingest import landing_states

    landing = new_digits(tmp_path / "landing")
    racing = [_ingest_process(versioned, landing) for _ in range(2)]

    assert [process.wait(timeout=120) for process in racing] == [0, 0]
    params = load_params(versioned / "params.yaml")
    assert len(images_in(versioned / "data")) == 120
    assert set(landing_states(str(landing), params).values()) == {"accepted"}
    assert len(list((landing / ".visionops" / "handled").rglob("*.json"))) == 20
    staging = versioned / ".visionops" / "staging"
    assert not staging.exists() or not list(staging.iterdir())


def test_s3_keys_not_plain_or_too_big_are_quarantined_and_never_block(versioned, tmp_path,
                                                                       object_store,
                                                                       monkeypatch):
    from visionops.io.ingest import landing_states

    client = object_store.client()
    client.create_bucket(Bucket="oddkeys")
    for image in images_in(new_digits(tmp_path / "source")):
        client.upload_file(str(image), "oddkeys", f"in/{image.parent.name}/{image.name}")
    client.put_object(Bucket="oddkeys", Key="in/0/", Body=b"")  # a folder placeholder
    client.put_object(Bucket="oddkeys", Key="in/0/sub/deep.png", Body=b"nested")
    client.put_object(Bucket="oddkeys", Key="in/stray.png", Body=b"no label")
    client.put_object(Bucket="oddkeys", Key="in/1/big.png", Body=os.urandom(1500))
    for key, value in object_store.env().items():
        monkeypatch.setenv(key, value)
    params = load_params(versioned / "params.yaml", validation__max_bytes=1000)

    first = ingest("s3://oddkeys/in", params)

    assert sorted(first.quarantined) == ["0/sub/deep.png", "1/big.png", "stray.png"]
    assert "path levels" in first.quarantined["0/sub/deep.png"][0]
    assert "1500 bytes, more than validation.max_bytes 1000" in first.quarantined["1/big.png"][0]
    assert len(first.pending) == 20
    second = ingest("s3://oddkeys/in", params)
    assert len(second.accepted) == 20 and not second.quarantined and not second.pending
    states = list(landing_states("s3://oddkeys/in", params).values())
    assert (states.count("accepted"), states.count("quarantined"), len(states)) == (20, 3, 23)
