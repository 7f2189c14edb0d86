"""Background servers started in their own process group, tracked by PID and stopped by
it: the local stack's object store, MLflow and Prefect, and the tests' servers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

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


def _stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: state, ppid, pgid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """True while the process runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = _stat(pid)[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    """The live processes in a process group (the server and the workers it forked)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(entry.name)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
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
