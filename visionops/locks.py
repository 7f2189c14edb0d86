"""Exclusive locks for what must not run twice at once (promotions, ingests).

With a Prefect server (`PREFECT_API_URL`, as on the team stack and every worker) the
lock is a Prefect global concurrency limit of 1, so it holds across machines and users;
its slot is leased, so a holder that is killed frees it when the lease runs out. Without
one (a laptop: SQLite store, Prefect's temporary server) every party is on this machine
and the lock is an fcntl lock on a file, which the OS frees when its holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

LOCK_TIMEOUT_S = 30 * 60  # a promotion or an ingest that waits longer is stuck: fail it
LEASE_S = 300             # Prefect renews the slot's lease while the holder lives


def prefect_server_url() -> str | None:
    """The Prefect server every party shares, or None (none set: Prefect's temporary
    server, which is private to one process and cannot serve as a lock)."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def limit_name(name: str) -> str:
    return "visionops-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def prefect_lock(name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit=1)
        except ObjectAlreadyExists:  # created meanwhile by another party (not atomic)
            pass
    with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S,
                     strict=True):
        yield


@contextlib.contextmanager
def exclusive(name: str, local_path: Path) -> Iterator[str]:
    """Hold the lock `name`; yields where it is held ("prefect:<limit>" or the file)."""
    if prefect_server_url():
        limit = limit_name(name)
        with prefect_lock(limit):
            yield f"prefect:{limit}"
    else:
        with file_lock(local_path):
            yield str(local_path)
