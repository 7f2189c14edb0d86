"""The dataset's versions: DVC for the content, git for the record (visionops.io.dataset)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.retry import TRANSIENT_RETRIES
from visionops.io.dataset import (
    DatasetRecord,
    DataVersion,
    pull_dataset,
    record_dataset,
    sync_recorded,
    version_dataset,
)


# Each try's limit covers the wait for DVC's lock (DVC_LOCK_WAIT_S) and the transfer.
@task(name="Pull dataset (DVC)", timeout_seconds=60 * 60, **TRANSIENT_RETRIES)
def pull_task(data_dir: Path) -> Path:
    return pull_dataset(data_dir)


@task(name="Check out the recorded dataset (git, DVC)", cache_policy=NO_CACHE,
      timeout_seconds=60 * 60, **TRANSIENT_RETRIES)
def sync_task(data_dir: Path, git_remote: str | None = None, git_branch: str = "main") -> str:
    """The newest data.dvc recorded on the git remote, then its content in the folder."""
    summary = sync_recorded(data_dir, git_remote, git_branch)
    get_run_logger().info(summary)
    return summary


@task(name="Version dataset (DVC)", timeout_seconds=60 * 60, **TRANSIENT_RETRIES)
def version_task(data_dir: Path) -> DataVersion:
    return version_dataset(data_dir)


@task(name="Record dataset version (git)", cache_policy=NO_CACHE, timeout_seconds=30 * 60,
      **TRANSIENT_RETRIES)
def record_task(data_dir: Path, remote: str | None, branch: str) -> DatasetRecord:
    record = record_dataset(data_dir, remote, branch)
    logger = get_run_logger()
    (logger.warning if remote and not record.commit else logger.info)("data.dvc %s",
                                                                       record.detail)
    return record
