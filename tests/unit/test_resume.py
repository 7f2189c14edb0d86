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
    assert (backup / "phase1" / "latest.weights.h5").is_file()

    resumed = train_model(tiny_prepared, FOUR_EPOCHS, AugmentParams(), tmp_path / "resumed",
                          verbose=0, backup_dir=backup)
    assert resumed.resumed_from_epoch == 2
    assert resumed.epochs_run == 2  # epochs 2 and 3 only
    assert resumed.backup_warning is None
    assert not backup.exists()  # a finished fit removes its backup


def test_a_half_written_backup_falls_back_to_the_epoch_before(tiny_prepared, tmp_path):
    backup = tmp_path / "backup"
    interrupted_fit(tiny_prepared, tmp_path, backup, epoch=3)
    (backup / "phase1" / "latest.weights.h5").write_bytes(b"\0" * 100)  # cut off while writing

    resumed = train_model(tiny_prepared, FOUR_EPOCHS, AugmentParams(), tmp_path / "resumed",
                          verbose=0, backup_dir=backup)
    assert resumed.resumed_from_epoch == 2
    assert resumed.epochs_run == 2
    assert resumed.backup_warning is None


def test_a_fine_tune_interrupted_in_its_second_phase_resumes_there(tmp_path, digits_folder):
    """Two phases (a backbone frozen, then its top unfrozen): a run killed during the
    second resumes there, the first phase's weights kept, not trained again."""
    data_dir = digits_folder(tmp_path / "data", per_class=8, keep=("0", "1"))
    prepared = prepare_data(data_dir, assign_splits(collect_facts(data_dir), SplitParams()),
                            DataParams(image_size=32, channels=1))
    from visionops.core.models import build_model, save_backbone_weights

    params = TrainParams(architecture="mobilenet_v3_small", epochs=1, batch_size=8,
                         early_stopping_patience=10,
                         fine_tune={"unfreeze_from": -5, "epochs": 2})
    weights = save_backbone_weights(build_model(params, (32, 32, 1), 2),
                                    tmp_path / "pretrained.weights.h5")
    params = params.model_copy(update={"pretrained": str(weights)})
    backup = tmp_path / "backup"
    with pytest.raises(KeyboardInterrupt):  # epoch 2 is the fine-tune's second
        train_model(prepared, params, AugmentParams(), tmp_path / "first",
                    callbacks=[Interrupt(2)], verbose=0, backup_dir=backup)
    assert (backup / "phase1-finished.weights.h5").is_file()

    class CountEpochs(keras.callbacks.Callback):
        begun: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            CountEpochs.begun.append(epoch)

    resumed = train_model(prepared, params, AugmentParams(), tmp_path / "again",
                          callbacks=[CountEpochs()], verbose=0, backup_dir=backup)
    assert CountEpochs.begun == [2]  # neither the first phase nor epoch 1 again
    assert resumed.resumed_from_epoch == 2
    assert resumed.fine_tuned_epochs == 1
    assert not backup.exists()


    # killed while writing the first phase's record: that phase is trained again
    with pytest.raises(KeyboardInterrupt):
        train_model(prepared, params, AugmentParams(), tmp_path / "third",
                    callbacks=[Interrupt(2)], verbose=0, backup_dir=backup)
    (backup / "phase1-finished.json").write_text('{"epochs": 1, "hist')
    CountEpochs.begun = []
    again = train_model(prepared, params, AugmentParams(), tmp_path / "fourth",
                        callbacks=[CountEpochs()], verbose=0, backup_dir=backup)
    assert CountEpochs.begun == [0, 1, 2]
    assert "could not be read" in again.backup_warning


def test_a_backup_that_does_not_load_is_discarded_with_a_warning(tiny_prepared, tmp_path,
                                                                  caplog):
    backup = tmp_path / "backup"
    interrupted_fit(tiny_prepared, tmp_path, backup, epoch=3)
    for file in (backup / "phase1").iterdir():
        file.write_bytes(b"garbage, not a backup")

    with caplog.at_level(logging.WARNING, logger="visionops.core.training"):
        trained = train_model(tiny_prepared, FOUR_EPOCHS, AugmentParams(), tmp_path / "again",
                              verbose=0, backup_dir=backup)
    assert trained.resumed_from_epoch == 0
    assert trained.epochs_run == 4
    assert trained.backup_warning.startswith(
        f"training backup {backup / 'phase1'} could not be restored")
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
