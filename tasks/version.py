"""Version the dataset with DVC: the data version is the md5 DVC records in
`<data>.dvc`, pushed to the default remote so it can be pulled back."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import task

from tasks.retry import TRANSIENT_RETRIES


@dataclass
class DataVersion:
    md5: str
    dvc_file: str | None  # None when the folder lies outside any DVC repository
    pushed_to: str | None


def _dvc_root(data_dir: Path) -> Path | None:
    for folder in [data_dir.parent, *data_dir.parent.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def dvc_file(data_dir: Path) -> Path:
    """`<data>.dvc` beside the folder: the dataset version DVC records."""
    return data_dir.with_name(data_dir.name + ".dvc")


def content_hash(data_dir: Path) -> str:
    """The md5 `dvc add` would record, computed without tracking the folder."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import LocalFileSystem, MemoryFileSystem

    scratch = HashFileDB(MemoryFileSystem(), "/scratch")
    _, _, tree = build(scratch, str(data_dir.resolve()), LocalFileSystem(), "md5")
    return tree.hash_info.value


def version_dataset(data_dir: Path, push: bool = True) -> DataVersion:
    """`dvc add` the folder (a no-op when unchanged) and push it to the default remote."""
    from dvc.repo import Repo

    data_dir = data_dir.resolve()
    root = _dvc_root(data_dir)
    if root is None:
        return DataVersion(md5=content_hash(data_dir), dvc_file=None, pushed_to=None)
    tracked_by = dvc_file(data_dir)
    # DVC prints git hints on stdout; keep stdout for the CLI's own output.
    with contextlib.redirect_stdout(sys.stderr), Repo(str(root)) as repo:
        repo.add(str(data_dir))
        remote = repo.config["core"].get("remote")
        if push and remote:
            repo.push(targets=[str(tracked_by)])
    md5 = yaml.safe_load(tracked_by.read_text())["outs"][0]["md5"]
    return DataVersion(md5=md5, dvc_file=str(tracked_by.relative_to(root)),
                       pushed_to=remote if push else None)


def needs_pull(data_dir: Path) -> bool:
    """The folder is tracked by a `.dvc` file but absent or empty here (a fresh clone, a
    new worker): its content is on the DVC remote."""
    tracked = dvc_file(data_dir).exists()
    return tracked and not (data_dir.is_dir() and any(data_dir.iterdir()))


def pull_dataset(data_dir: Path) -> Path:
    """`dvc pull` the version `<data>.dvc` records from the default remote."""
    from dvc.repo import Repo

    data_dir = data_dir.resolve()
    root = _dvc_root(data_dir)
    if root is None:
        raise FileNotFoundError(f"{data_dir}: not inside a DVC repository, nothing to pull")
    with contextlib.redirect_stdout(sys.stderr), Repo(str(root)) as repo:
        repo.pull(targets=[str(dvc_file(data_dir))])
    return data_dir


@task(name="Pull dataset (DVC)", **TRANSIENT_RETRIES)
def pull_task(data_dir: Path) -> Path:
    return pull_dataset(data_dir)


@task(name="Version dataset (DVC)", **TRANSIENT_RETRIES)
def version_task(data_dir: Path) -> DataVersion:
    return version_dataset(data_dir)
