"""Resuming an interrupted fit from its backup, discarding a backup that does not load,
and one backup folder per live run."""

import logging
import signal
import subprocess
import sys
import textwrap

import keras
import pytest

from visionops.core.config import AugmentParams, DataParams, SplitParams, TrainParams
from visionops.core.demo import write_digits
from visionops.core.split import assign_splits, prepare_data
from visionops.core.training import claim_backup_dir, train_model
from visionops.io.validation import collect_facts

FOUR_EPOCHS = TrainParams(epochs=4, batch_size=16, seed=42, early_stopping_patience=10)
KEY = "code0-data1-params2"


class Interrupt(keras.callbacks.Callback):
    """Stops the fit as a kill would, when `epoch` (zero-based) is about to begin."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"interrupted before epoch {epoch}")


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("digits") / "data"
    write_digits(data_dir, per_class=10, labels=range(3))
    table = assign_splits(collect_facts(data_dir), SplitParams())
    return prepare_data(data_dir, table, DataParams(image_size=28, channels=1))


def interrupted_fit(prepared, tmp_path, backup, epoch: int) -> None:
    with pytest.raises(KeyboardInterrupt):
        train_model(prepared, FOUR_EPOCHS, AugmentParams(), tmp_path / "interrupted",
                    callbacks=[Interrupt(epoch)], verbose=0, backup_dir=backup)


def test_an_interrupted_fit_resumes_after_its_last_finished_epoch(tiny_prepared, tmp_path):
    backup = tmp_path / "backup"
    interrupted_fit(tiny_prepared, tmp_path, backup, epoch=2)
    assert (backup / "latest.weights.h5").is_file()

    resumed = train_model(tiny_prepared, FOUR_EPOCHS, AugmentParams(), tmp_path / "resumed",
                          verbose=0, backup_dir=backup)
    assert resumed.resumed_from_epoch == 2
    assert resumed.epochs_run == 2  # epochs 2 and 3 only
    assert resumed.backup_warning is None
    assert not backup.exists()  # a finished fit removes its backup


def test_a_half_written_backup_falls_back_to_the_epoch_before(tiny_prepared, tmp_path):
    backup = tmp_path / "backup"
    interrupted_fit(tiny_prepared, tmp_path, backup, epoch=3)
    (backup / "latest.weights.h5").write_bytes(b"\0" * 100)  # cut off while writing

    resumed = train_model(tiny_prepared, FOUR_EPOCHS, AugmentParams(), tmp_path / "resumed",
                          verbose=0, backup_dir=backup)
    assert resumed.resumed_from_epoch == 2
    assert resumed.epochs_run == 2
    assert resumed.backup_warning is None


def test_a_backup_that_does_not_load_is_discarded_with_a_warning(tiny_prepared, tmp_path,
                                                                  caplog):
    backup = tmp_path / "backup"
    interrupted_fit(tiny_prepared, tmp_path, backup, epoch=3)
    for file in backup.iterdir():
        file.write_bytes(b"garbage, not a backup")

    with caplog.at_level(logging.WARNING, logger="visionops.core.training"):
        trained = train_model(tiny_prepared, FOUR_EPOCHS, AugmentParams(), tmp_path / "again",
                              verbose=0, backup_dir=backup)
    assert trained.resumed_from_epoch == 0
    assert trained.epochs_run == 4
    assert trained.backup_warning.startswith(f"training backup {backup} could not be restored")
    assert "discarded it and trained from scratch" in trained.backup_warning
    assert trained.backup_warning in caplog.text
    assert not backup.exists()

    # and the next fit with that folder is an ordinary one
    again = train_model(tiny_prepared, FOUR_EPOCHS.model_copy(update={"epochs": 1}),
                        AugmentParams(), tmp_path / "next", verbose=0, backup_dir=backup)
    assert (again.epochs_run, again.backup_warning) == (1, None)


def test_a_second_live_claim_gets_a_private_folder_removed_afterwards(tmp_path):
    with claim_backup_dir(tmp_path, KEY) as first:
        assert first == tmp_path / KEY
        with claim_backup_dir(tmp_path, KEY) as second:
            assert second.parent == tmp_path
            assert second.name.startswith(f"{KEY}-") and second != first
            second.mkdir()
            (second / "latest.weights.h5").write_bytes(b"state")
        assert not second.exists()
        first.mkdir()
    assert first.is_dir()  # kept: a crashed run's successor resumes from it
    with claim_backup_dir(tmp_path, KEY) as third:
        assert third == first


HOLD_A_CLAIM = textwrap.dedent("""
    import sys
    from pathlib import Path
    from visionops.core.training import claim_backup_dir
    with claim_backup_dir(Path(sys.argv[1]), sys.argv[2]) as folder:
        folder.mkdir()
        (folder / "latest.weights.h5").write_bytes(b"state")
        print(folder, flush=True)
        sys.stdin.read()  # holds the claim until killed
""")


def hold_a_claim(base, key) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", HOLD_A_CLAIM, str(base), key],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()


def test_a_killed_runs_folder_goes_to_the_next_run_of_its_lineage(tmp_path):
    process, held = hold_a_claim(tmp_path, KEY)
    try:
        assert held == str(tmp_path / KEY)
        with claim_backup_dir(tmp_path, KEY) as concurrent:
            assert concurrent != tmp_path / KEY  # the live run keeps its backup to itself
    finally:
        kill(process)
    with claim_backup_dir(tmp_path, KEY) as successor:
        assert successor == tmp_path / KEY
        assert (successor / "latest.weights.h5").read_bytes() == b"state"


def test_a_killed_runs_private_folder_is_removed_by_the_next_claim(tmp_path):
    with claim_backup_dir(tmp_path, KEY) as lineage:
        process, held = hold_a_claim(tmp_path, KEY)
        kill(process)
        assert held != str(lineage)
        assert (tmp_path / held / "latest.weights.h5").is_file()  # abandoned by the kill
        with claim_backup_dir(tmp_path, KEY) as private:
            assert not (tmp_path / held).exists()
            assert private != tmp_path / held
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{KEY}.lock"]
