import os
import stat

import pytest

from visionops.core.files import private_folder, write_atomic
from visionops.ops.stack import Stack


def test_an_existing_file_gets_the_private_mode_not_its_old_one(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    os.chmod(target, 0o644)
    write_atomic(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_atomic(target, '{"pids": {"s3": 1}}')

    def power_cut(descriptor):
        raise OSError("power cut")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError, match="power cut"):
        write_atomic(target, '{"pids": {"s3": 2}}')
    assert target.read_text() == '{"pids": {"s3": 1}}'
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]


def test_a_symlink_in_place_of_the_file_is_replaced_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("untouched")
    link = tmp_path / "stack.env"
    link.symlink_to(elsewhere)
    write_atomic(link, "SECRET=1")
    assert elsewhere.read_text() == "untouched"
    assert not link.is_symlink() and link.read_text() == "SECRET=1"


def test_the_stack_state_folder_is_private_and_refuses_a_symlink(tmp_path):
    state = tmp_path / ".stack"
    state.mkdir(mode=0o755)
    (state / "state.json").write_text("{}")
    os.chmod(state / "state.json", 0o644)
    Stack(project=tmp_path, state_dir=state, secrets={"mlflow_admin": "x"}).save()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "state.json").stat().st_mode) == 0o600
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="symlink"):
        private_folder(tmp_path / "linked")
