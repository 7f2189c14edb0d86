"""Exclusive locks for what must not run twice at once (promotions, registrations).

Every party takes an fcntl lock on a file of this machine (beside a SQLite store, so
everyone using that store shares it), which the OS frees when its holder dies. With a
Prefect server (`PREFECT_API_URL`, as on the team stack and every worker) a party also
takes a Prefect global concurrency limit of 1 first, so the lock holds across machines
and users; its slot is leased, so a holder that is killed frees it when the lease runs out.
A party without `PREFECT_API_URL` on another machine than the store is not excluded:
set it wherever the team's stores are used (`visionops stack env --pipeline` does). A
person's shell (`stack env --user`) gets no Prefect access, since the auth string lets
its holder run commands on the worker; their promotions take the lock of their machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_TIMEOUT_S = 30 * 60  # a promotion or an ingest that waits longer is stuck: fail it
LEASE_S = 300             # Prefect renews the slot's lease while the holder lives


class LockTimeout(RuntimeError):
    """The lock was held by another party for longer than we wait: not a transient
    fault to retry (a retry would wait as long again)."""

    def __init__(self, where: str, timeout_s: float, holder: str = ""):
        self.where, self.timeout_s, self.holder = where, timeout_s, holder
        by = f" ({holder})" if holder else ""
        super().__init__(f"{where}: held by another process{by} for over {timeout_s:.0f} s")


def prefect_server_url() -> str | None:
    """The Prefect server every party shares, or None (none set: Prefect's temporary
    server, which is private to one process and cannot serve as a lock)."""
    from prefect.settings import PREFECT_API_URL

    url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None
    # PREFECT_API_URL may name the `visionops` command's own temporary server
    # (visionops.ops.warmstart): a server shared with no one
    return None if url == os.environ.get("VISIONOPS_TEMPORARY_PREFECT_API_URL") else url


def limit_name(name: str) -> str:
    return "visionops-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An fcntl lock on `path` (never through a link, readable by its owner only), which
    records its holder ("pid N on host") for whoever waits on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    raise LockTimeout(str(path), timeout_s, holder) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


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
        raise LockTimeout(f"prefect:{name}", timeout_s) from None
    with contextlib.ExitStack() as release:
        release.push(slot)
        yield


@contextlib.contextmanager
def exclusive(name: str, local_path: Path, timeout_s: float = LOCK_TIMEOUT_S
              ) -> Iterator[list[str]]:
    """Hold the lock `name`; yields where it is held (the Prefect limit, the file).
    LockTimeout, naming where, after waiting `timeout_s` for either."""
    with contextlib.ExitStack() as held:
        where = []
        if prefect_server_url():
            where.append(f"prefect:{limit_name(name)}")
            held.enter_context(prefect_lock(limit_name(name), timeout_s))
        held.enter_context(file_lock(local_path, timeout_s))
        where.append(str(local_path))
        yield where
