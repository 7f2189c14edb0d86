"""Every landing file ends accepted, quarantined with a reason, or pending: a class too
small waits, refused files are marked with reasons (their content never copied through
a link or read when too big), and ingests into one project are serialised."""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections import Counter
from pathlib import Path

import pytest
from projects import digits

from visionops.core.config import load_params
from visionops.io.dataset import version_dataset
from visionops.io.ingest import (
    IngestBusy,
    file_state,
    ingest,
    ingest_lock,
    landing_lock,
    landing_lock_name,
    landing_states,
)
from visionops.io.landing import key_digest, open_landing
from visionops.io.locks import limit_name, prefect_lock


def states(landing: Path, params) -> Counter:
    return Counter(landing_states(str(landing), params).values())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_class_too_small_stays_pending_until_enough_images_arrive(project, tmp_path):
    params = load_params(project / "params.yaml")  # min_images_per_class: 5
    landing = digits(tmp_path / "landing", label=0, first=25, count=4)
    digits(landing, label=7, first=0, count=3)

    first = ingest(str(landing), params, push=False)

    assert len(first.accepted) == 4 and not first.quarantined and first.quarantine_dir is None
    assert sorted(first.pending) == sorted(f"7/{p.name}" for p in (landing / "7").iterdir())
    assert all("3 images, fewer than 5" in reason for reason in first.pending.values())
    assert "3 pending" in first.describe()
    assert not (project / "data" / "7").exists()
    assert states(landing, params) == {"accepted": 4, "pending": 3}

    digits(landing, label=7, first=3, count=2)
    second = ingest(str(landing), params, push=False)

    assert len(second.accepted) == 5 and not second.pending and not second.quarantined
    assert len(list((project / "data" / "7").iterdir())) == 5
    assert states(landing, params) == {"accepted": 9}

    next((project / "data" / "7").iterdir()).unlink()  # a version that lost a file
    version_dataset(project / "data", push=False)
    assert states(landing, params) == {"accepted": 8, "lost": 1}


def test_links_odd_keys_and_oversize_files_are_quarantined_unread_and_marked(project,
                                                                             tmp_path):
    params = load_params(project / "params.yaml", validation__max_bytes=100_000)
    landing = digits(tmp_path / "landing", label=1, first=25, count=3)
    outside = digits(tmp_path / "outside", label=5, first=0, count=5)
    secret = next((outside / "5").iterdir())
    (landing / "1" / "link.png").symlink_to(secret)
    (landing / "5").symlink_to(outside / "5")
    (landing / "1" / "nested").mkdir()
    shutil.copy(secret, landing / "1" / "nested" / "deep.png")
    (landing / "1" / "notes.txt").write_text("not an image")
    (landing / "1" / "broken.png").write_bytes(secret.read_bytes()[:30])
    with open(landing / "1" / "huge.png", "wb") as huge:
        huge.truncate(10**10)  # sparse: reading it would take minutes and 10 GB

    result = ingest(str(landing), params, push=False)

    reasons = {key: " ".join(why) for key, why in result.quarantined.items()}
    assert set(reasons) == {"1/link.png", "5", "1/nested/deep.png", "1/notes.txt",
                            "1/huge.png", "1/broken.png"}
    assert "symbolic link" in reasons["1/link.png"] and "symbolic link" in reasons["5"]
    assert "path levels" in reasons["1/nested/deep.png"]
    assert "suffix '.txt'" in reasons["1/notes.txt"]
    assert "10000000000 bytes, more than validation.max_bytes 100000" in reasons["1/huge.png"]
    assert "decodable" in reasons["1/broken.png"]
    assert len(result.pending) == 3 and not result.accepted, "the valid files wait"

    quarantine = Path(result.quarantine_dir)
    kept = [p for p in quarantine.rglob("*") if p.is_file()]
    copies = [p for p in kept if not p.name.endswith(".reason.txt")]
    assert [p.name for p in copies] == ["broken.png"], "only a file read safely is kept"
    assert len(kept) == 7
    assert (quarantine / ".refused" / "5.reason.txt").is_file()
    assert all(mode(p) == 0o600 for p in kept)
    assert all(mode(p) == 0o700 for p in [quarantine.parent, quarantine,
                                          *(p for p in quarantine.rglob("*") if p.is_dir())])
    assert not (project / "data" / "5").exists()

    again = ingest(str(landing), params, push=False)

    assert len(again.accepted) == 3 and not again.quarantined and not again.pending
    assert states(landing, params) == {"accepted": 3, "quarantined": 6}


def test_ingests_are_serialised_and_only_dead_ones_staging_is_removed(project, tmp_path):
    params = load_params(project / "params.yaml")
    landing = digits(tmp_path / "landing", label=2, first=25, count=2)
    others = project / ".visionops" / "staging" / "another-ingest"
    others.mkdir(parents=True)

    with ingest_lock(project / ".visionops" / "ingest.lock"):
        with pytest.raises(IngestBusy, match=f"pid {os.getpid()}"):
            ingest(str(landing), params, push=False, lock_timeout=0.3)
        assert others.is_dir(), "a running ingest's staging is left alone"

    result = ingest(str(landing), params, push=False)

    assert len(result.accepted) == 2
    assert not others.exists(), "a dead ingest's staging is removed under the lock"
    assert not list((project / ".visionops" / "staging").iterdir()), "and its own is too"


def test_a_marker_is_a_state_only_when_it_names_what_it_should():
    in_version = {"0/abc.png"}
    assert file_state(None, in_version) == "pending"
    assert file_state({"status": "accepted", "path": "0/abc.png"}, in_version) == "accepted"
    assert file_state({"status": "accepted", "path": "0/gone.png"}, in_version) == "lost"
    assert file_state({"status": "quarantined", "reasons": ["x"]}, in_version) == "quarantined"
    assert file_state({"status": "quarantined", "reasons": []}, in_version) == "lost"


def test_long_names_are_quarantined_with_their_key_and_never_block_later_ingests(project,
                                                                                 tmp_path):
    params = load_params(project / "params.yaml")
    landing = digits(tmp_path / "landing", label=1, first=25, count=3)
    long_name = "a" * 250 + ".png"  # a plain key; "<name>.reason.txt" would be 265 bytes
    (landing / "1" / long_name).write_bytes(b"not an image")
    nested = landing / "1" / ("d" * 200) / ("e" * 200 + ".png")  # percent-encoded: 414 bytes
    nested.parent.mkdir()
    shutil.copy(next((landing / "1").glob("25-*")), nested)
    long_key, nested_key = f"1/{long_name}", f"1/{'d' * 200}/{'e' * 200}.png"

    first = ingest(str(landing), params, push=False)

    assert sorted(first.quarantined) == sorted([long_key, nested_key])
    assert len(first.pending) == 3 and not first.accepted
    quarantine = Path(first.quarantine_dir)
    assert (quarantine / "1" / long_name).read_bytes() == b"not an image"
    reason = (quarantine / "1" / f"{key_digest(long_key)}.reason.txt").read_text()
    assert json.dumps(long_key) in reason and "decodable" in reason
    refused = (quarantine / ".refused" / f"{key_digest(nested_key)}.reason.txt").read_text()
    assert json.dumps(nested_key) in refused and "path levels" in refused

    second = ingest(str(landing), params, push=False)

    assert len(second.accepted) == 3 and not second.quarantined and not second.pending
    assert states(landing, params) == {"accepted": 3, "quarantined": 2}


def test_a_file_whose_quarantine_cannot_be_written_never_blocks_the_others(project,
                                                                          tmp_path):
    deep = tmp_path / "q"  # so deep that only a short name's reason file fits in PATH_MAX
    while len(str(deep)) < 3850:
        deep /= "q" * 190
    params = load_params(project / "params.yaml", ingest__quarantine_dir=str(deep))
    landing = digits(tmp_path / "landing", label=1, first=25, count=3)
    (landing / "1" / "broken.png").write_bytes(b"not an image")
    (landing / "1" / ("a" * 250 + ".png")).write_bytes(b"not an image either")
    (landing / ".visionops" / "handled" / "1").mkdir(parents=True)
    (landing / ".visionops" / "handled" / "1" / "broken.png").write_text("in the way")

    first = ingest(str(landing), params, push=False)

    long_reasons = first.quarantined["1/" + "a" * 250 + ".png"]
    assert "could not be written" in long_reasons[-1] and "File name too long" in long_reasons[-1]
    assert "marker could not be written" in first.pending["1/broken.png"]
    assert states(landing, params) == {"quarantined": 1, "pending": 4}

    (landing / ".visionops" / "handled" / "1" / "broken.png").unlink()
    ingest(str(landing), params, push=False)
    third = ingest(str(landing), params, push=False)

    assert len(third.accepted) == 3
    assert states(landing, params) == {"accepted": 3, "quarantined": 2}


def test_two_clones_ingesting_one_landing_area_take_turns(project, tmp_path):
    params = load_params(project / "params.yaml")
    landing = digits(tmp_path / "landing", label=2, first=25, count=2)
    url = open_landing(str(landing)).url

    with landing_lock(url), \
            pytest.raises(IngestBusy, match="another ingest from this landing area"):
        ingest(f"{landing}/./", params, push=False, lock_timeout=0.3)  # another spelling

    assert len(ingest(str(landing), params, push=False).accepted) == 2


def test_with_a_prefect_server_ingests_from_one_landing_area_exclude_each_other_anywhere(
        prefect_server, project, tmp_path):
    params = load_params(project / "params.yaml")
    landing = digits(tmp_path / "landing", label=2, first=25, count=2)
    url = open_landing(str(landing)).url

    with prefect_lock(limit_name(landing_lock_name(url))), \
            pytest.raises(IngestBusy, match="prefect:visionops-ingest-"):
        ingest(str(landing), params, push=False, lock_timeout=1)

    assert len(ingest(str(landing), params, push=False).accepted) == 2
