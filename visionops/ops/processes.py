"""Background servers started in their own process group, tracked by PID and stopped by
it: the local stack's object store, MLflow and Prefect, and the tests' servers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

# SIGINT first: a Prefect worker ignores SIGTERM while its server is down. SIGKILL last:
# SeaweedFS can hang in its graceful shutdown.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


def start(command: Sequence[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> int:
    """Start `command` detached in a new session (it outlives its caller); output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as output:
        process = subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                   start_new_session=True)
    return process.pid


def alive(pid: int) -> bool:
    """True while the process runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    """The live processes in a process group (the server and the workers it forked)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if (os.getpgid(process.pid) == pgid
                    and process.info["status"] != psutil.STATUS_ZOMBIE):
                members.append(process.pid)
        except ProcessLookupError:  # it ended meanwhile
            continue
    return members


def stop(pid: int, timeout: float = 10) -> None:
    """Stop the process group `pid` leads: SIGINT, then SIGTERM, then SIGKILL, each
    given `timeout` seconds, until no process of the group is left."""
    for sig in STOP_SIGNALS:
        if not group_members(pid) and not alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive(pid)  # reaps it when it is our child
            if not group_members(pid):
                return
            time.sleep(0.1)
