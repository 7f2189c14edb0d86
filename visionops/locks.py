"""Exclusive locks for what must not run twice at once (promotions, registrations).

Every party takes an fcntl lock on a file of this machine (beside a SQLite store, so
everyone using that store shares it), which the OS frees when its holder dies. With a
Prefect server (`PREFECT_API_URL`, as on the team stack and every worker) a party also
takes a Prefect global concurrency limit of 1 first, so the lock holds across machines
and users; its slot is leased, so a holder that is killed frees it when the lease runs out.
A party without `PREFECT_API_URL` on another machine than the store is not excluded:
set it wherever the team's stores are used (`visionops stack env` does).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_TIMEOUT_S = 30 * 60  # a promotion or an ingest that waits longer is stuck: fail it
LEASE_S = 300             # Prefect renews the slot's lease while the holder lives


class LockTimeout(RuntimeError):
    """The lock was held by another party for longer than we wait: not a transient
    fault to retry (a retry would wait as long again)."""


def prefect_server_url() -> str | None:
    """The Prefect server every party shares, or None (none set: Prefect's temporary
    server, which is private to one process and cannot serve as a lock)."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def limit_name(name: str) -> str:
    return "visionops-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{path}: held by another process for over "
                                      f"{timeout_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def prefect_lock(name: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, \
            contextlib.suppress(ObjectAlreadyExists):  # created meanwhile (not atomic)
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    try:
        slot = concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S,
                           strict=True)
        slot.__enter__()
    except TimeoutError:
        raise LockTimeout(f"Prefect concurrency limit {name}: held by another party for "
                          f"over {timeout_s:.0f} s") from None
    with contextlib.ExitStack() as release:
        release.push(slot)
        yield


@contextlib.contextmanager
def exclusive(name: str, local_path: Path) -> Iterator[list[str]]:
    """Hold the lock `name`; yields where it is held (the Prefect limit, the file)."""
    with contextlib.ExitStack() as held:
        where = []
        if prefect_server_url():
            where.append(f"prefect:{limit_name(name)}")
            held.enter_context(prefect_lock(limit_name(name)))
        held.enter_context(file_lock(local_path))
        where.append(str(local_path))
        yield where
