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
    dvc_file = data_dir.with_name(data_dir.name + ".dvc")
    # DVC prints git hints on stdout; keep stdout for the CLI's own output.
    with contextlib.redirect_stdout(sys.stderr), Repo(str(root)) as repo:
        repo.add(str(data_dir))
        remote = repo.config["core"].get("remote")
        if push and remote:
            repo.push(targets=[str(dvc_file)])
    md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    return DataVersion(md5=md5, dvc_file=str(dvc_file.relative_to(root)),
                       pushed_to=remote if push else None)


@task(name="Version dataset (DVC)", **TRANSIENT_RETRIES)
def version_task(data_dir: Path) -> DataVersion:
    return version_dataset(data_dir)
