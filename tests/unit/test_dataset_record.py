"""A new data.dvc is committed and pushed to a git remote (a bare repository here), so
a fresh clone of that branch gets the dataset version an ingest produced."""

import subprocess
from pathlib import Path

import pytest
from dvc.repo import Repo

from tasks.version import record_task, sync_task, version_task
from visionops.core.demo import write_digits
from visionops.io.dataset import (
    DatasetVersionConflict,
    adopt_recorded_version,
    content_hash,
    record_dataset_version,
    sync_dataset,
    version_dataset,
)

AS_TESTER = ["-c", "user.name=tester", "-c", "user.email=tester@localhost"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *AS_TESTER, *args], cwd=cwd, check=True, text=True,
                          capture_output=True).stdout.strip()


@pytest.fixture
def worker(tmp_path, monkeypatch) -> Path:
    """A clone of the project (git and DVC, a DVC remote outside it) whose origin is a
    bare repository; git has no identity configured, as on a fresh worker."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "empty-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", "origin.git")
    root = tmp_path / "worker"
    root.mkdir()
    git(root, "init", "--quiet", "-b", "main")
    Repo.init(str(root)).close()
    (root / ".dvc" / "config").write_text(
        "[core]\n    remote = local\n    analytics = false\n"
        f"['remote \"local\"']\n    url = {tmp_path / 'dvc-storage'}\n")
    (root / "params.yaml").write_text("seed: 1\n")
    git(root, "add", ".")
    git(root, "commit", "--quiet", "-m", "project")
    git(root, "remote", "add", "origin", str(tmp_path / "origin.git"))
    git(root, "push", "--quiet", "origin", "main")
    write_digits(root / "data", per_class=3, labels=range(2))
    return root


def fresh_clone(worker: Path, name: str = "fresh") -> Path:
    clone = worker.parent / name
    git(worker.parent, "clone", "--quiet", "-b", "main", "origin.git", str(clone))
    return clone


def add_image(data: Path, name: str) -> None:
    """A file of its own content: only the worker that added it has it in its cache."""
    (data / "1" / name).write_bytes(name.encode())


def test_a_fresh_clone_gets_the_new_dataset_version(worker):
    version = version_dataset(worker / "data")  # also adds /data to .gitignore
    (worker / "params.yaml").write_text("seed: 2\n")  # edits of the worker's own...
    (worker / "notes.txt").write_text("draft\n")
    git(worker, "add", "notes.txt")                   # ...staged or not, are not committed

    record = record_dataset_version(worker, worker / "data.dvc", version.md5, "origin", "main")

    clone = fresh_clone(worker)
    assert git(clone, "rev-parse", "HEAD") == record.commit
    assert (clone / "data.dvc").read_text() == (worker / "data.dvc").read_text()
    assert "/data" in (clone / ".gitignore").read_text().splitlines()
    assert (clone / "params.yaml").read_text() == "seed: 1\n"
    assert not (clone / "notes.txt").exists()
    subject, author, *files = git(clone, "log", "-1", "--name-only",
                                  "--format=%s%n%an <%ae>").split("\n")
    assert version.md5 in subject
    assert author == "visionops <visionops@localhost>"
    assert sorted(filter(None, files)) == [".gitignore", "data.dvc"]
    assert sync_dataset(clone / "data") == "pulled"
    assert content_hash(clone / "data") == version.md5
    # Here too data.dvc is committed, and the other edits are as they were.
    assert version.md5 in git(worker, "log", "-1", "--format=%s")
    assert sorted(git(worker, "status", "--porcelain").splitlines()) == [
        " M params.yaml", "A  notes.txt"]


def test_a_remote_branch_that_moved_gets_the_version_on_top(worker):
    first = version_dataset(worker / "data")
    record_dataset_version(worker, worker / "data.dvc", first.md5, "origin", "main")
    colleague = fresh_clone(worker, "colleague")
    (colleague / "README.md").write_text("a code change pushed meanwhile\n")
    with (colleague / ".gitignore").open("a") as ignore:
        ignore.write("/reports\n")
    git(colleague, "add", "README.md", ".gitignore")
    git(colleague, "commit", "--quiet", "-m", "docs")
    git(colleague, "push", "--quiet", "origin", "main")
    moved_to = git(colleague, "rev-parse", "HEAD")

    add_image(worker / "data", "new.png")
    second = version_dataset(worker / "data")
    record = record_dataset_version(worker, worker / "data.dvc", second.md5, "origin", "main")

    clone = fresh_clone(worker)
    assert git(clone, "rev-parse", "HEAD~1") == moved_to
    assert (clone / "README.md").is_file()
    assert (clone / ".gitignore").read_text() == "/data\n/reports\n"
    assert (clone / "data.dvc").read_text() == (worker / "data.dvc").read_text()
    assert not (worker / "README.md").exists()  # the worker's checkout is left alone
    again = record_dataset_version(worker, worker / "data.dvc", second.md5, "origin", "main")
    assert again.commit == record.commit and "already" in again.detail


def test_a_version_recorded_elsewhere_is_never_overwritten(worker):
    first = version_dataset(worker / "data")
    record_dataset_version(worker, worker / "data.dvc", first.md5, "origin", "main")
    other_worker = fresh_clone(worker, "other-worker")
    other_md5 = "0123456789abcdef0123456789abcdef.dir"
    dvc_text = (other_worker / "data.dvc").read_text()
    (other_worker / "data.dvc").write_text(dvc_text.replace(first.md5, other_md5))
    git(other_worker, "commit", "--quiet", "-am", "other ingest")
    git(other_worker, "push", "--quiet", "origin", "main")

    add_image(worker / "data", "new.png")
    second = version_dataset(worker / "data")
    with pytest.raises(DatasetVersionConflict, match=other_md5) as conflict:
        record_dataset_version(worker, worker / "data.dvc", second.md5, "origin", "main")
    assert second.md5 in str(conflict.value)
    assert other_md5 in (fresh_clone(worker) / "data.dvc").read_text()
    kept = adopt_recorded_version(worker, worker / "data.dvc", "origin", "main")
    assert kept.startswith(f"{second.md5} kept")
    assert version_dataset(worker / "data").md5 == second.md5


def test_a_worker_builds_on_the_version_another_worker_recorded(worker):
    first = version_dataset(worker / "data")
    record_dataset_version(worker, worker / "data.dvc", first.md5, "origin", "main")
    other_worker = fresh_clone(worker, "other-worker")
    assert sync_dataset(other_worker / "data") == "pulled"
    add_image(other_worker / "data", "from-other.png")
    second = version_dataset(other_worker / "data")
    record_dataset_version(other_worker, other_worker / "data.dvc", second.md5, "origin",
                           "main")

    adopted = adopt_recorded_version(worker, worker / "data.dvc", "origin", "main")
    assert adopted == f"{second.md5} adopted from origin main"
    assert sync_dataset(worker / "data") == "pulled"
    assert (worker / "data" / "1" / "from-other.png").is_file()
    assert git(worker, "status", "--porcelain") == ""
    add_image(worker / "data", "from-worker.png")
    third = version_dataset(worker / "data")
    record_dataset_version(worker, worker / "data.dvc", third.md5, "origin", "main")
    clone = fresh_clone(worker)
    assert sync_dataset(clone / "data") == "pulled"
    assert content_hash(clone / "data") == third.md5
    assert {"from-other.png", "from-worker.png"} <= {
        image.name for image in (clone / "data" / "1").iterdir()}


def test_nothing_is_recorded_without_a_remote_or_outside_git(worker, dvc_outside_git):
    version = version_dataset(worker / "data")
    head = git(worker, "rev-parse", "HEAD")
    record = record_dataset_version(worker, worker / "data.dvc", version.md5, None, "main")
    assert record.commit is None and "git_remote is null" in record.detail
    assert git(worker, "rev-parse", "HEAD") == head
    assert "?? data.dvc" in git(worker, "status", "--porcelain").splitlines()

    outside = version_dataset(dvc_outside_git / "data")
    record = record_dataset_version(dvc_outside_git, dvc_outside_git / "data.dvc",
                                    outside.md5, "origin", "main")
    assert record.commit is None and "not in a git repository" in record.detail


def test_a_dvc_file_that_names_another_version_is_refused(worker):
    version_dataset(worker / "data")
    with pytest.raises(ValueError, match=r"data\.dvc: records .* not the version"):
        record_dataset_version(worker, worker / "data.dvc", "feed.dir", "origin", "main")


def test_the_flow_tasks_sync_then_record(worker, prefect_server):
    """What the retrain flow does: the recorded version first, then the new one pushed."""
    from prefect import flow

    first = version_dataset(worker / "data")
    record_dataset_version(worker, worker / "data.dvc", first.md5, "origin", "main")
    (worker / "data" / "0" / "digit_0000.png").unlink()  # a stale, known version...
    stale = version_dataset(worker / "data")
    git(worker, "checkout", "--quiet", "--", "data.dvc")  # ...and data.dvc back at first

    @flow
    def nightly():
        synced = sync_task(worker / "data", "origin", "main")
        add_image(worker / "data", "ingested.png")
        version = version_task(worker / "data")
        return synced, version, record_task(worker / "data", "origin", "main")

    synced, version, record = nightly()
    assert stale.md5 != first.md5
    assert synced == f"data.dvc: {first.md5}, as on origin main; data/: checked out"
    clone = fresh_clone(worker)
    assert git(clone, "rev-parse", "HEAD") == record.commit
    assert sync_dataset(clone / "data") == "pulled"
    assert content_hash(clone / "data") == version.md5
    assert (clone / "data" / "0" / "digit_0000.png").is_file()


@pytest.fixture
def dvc_outside_git(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("no-git")
    write_digits(root / "data", per_class=3, labels=range(2))
    Repo.init(str(root), no_scm=True).close()
    return root
