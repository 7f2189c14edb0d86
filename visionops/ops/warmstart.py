"""Start-up work side by side. Before its first step a retrain waits seconds for Prefect's
temporary server (no PREFECT_API_URL) and spends seconds importing TensorFlow,
great-expectations and the flow. The server is a separate process, so start it first and
import while it comes up; on 2 cores the two then take the time of the longer one."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence


def start_prefect_server() -> threading.Thread | None:
    """Start the temporary server the flow's first API call would start (Prefect's own
    SubprocessASGIServer, a per-process singleton the flow then finds running), in a
    thread that ends once the server answers. None when PREFECT_API_URL names a server.
    Join the thread before the flow starts: until the server answers, the flow would
    find it marked running and call it too early. The server dies with this process,
    even one killed outright (see `ServerGuard`)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.server.api.server import SubprocessASGIServer

    ensure_logging_setup()  # so its "Starting temporary server on <url>" line is shown
    starting = threading.Thread(target=_start_guarded, args=(SubprocessASGIServer(),),
                                daemon=True, name="prefect-temporary-server")
    starting.start()
    return starting


def _start_guarded(server) -> None:
    """Start `server` and have a `ServerGuard` watch each server process it launches (it
    launches another when its port was taken), from the moment it is launched."""
    guard = ServerGuard.start() if hasattr(server, "server_process") else None
    if guard is None and sys.platform.startswith("linux"):
        warnings.warn("Prefect's SubprocessASGIServer has no `server_process` any more: its "
                      "temporary server will outlive this process if it is killed outright",
                      RuntimeWarning, stacklevel=1)
    # If it fails here, the flow's own start() tries again and raises Prefect's error.
    launching = threading.Thread(target=server.start, daemon=True)
    launching.start()
    watched = None
    while True:
        launched = not launching.is_alive()
        process = getattr(server, "server_process", None)
        if guard is not None and process is not None and process.pid != watched:
            guard.watch(process.pid)
            watched = process.pid
        if launched:
            return
        launching.join(0.05)


class ServerGuard:
    """A small process that ends the processes it watches once this one is gone, however
    it ended. Prefect stops its temporary server at exit, which a process killed outright
    (SIGKILL, the OOM killer) never reaches. The guard holds the read end of a pipe whose
    only write end is this process's: when this process is gone the read ends, and the
    guard stops each watched process (SIGTERM, SIGKILL after 10 s) that is still the one
    it was told about, then exits. Linux only (it reads /proc)."""

    _running: list[ServerGuard] = []  # kept: closing the pipe is what stops the server

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def start(cls) -> ServerGuard | None:
        if not sys.platform.startswith("linux"):
            return None
        # Its own session: a Ctrl-C at the terminal stops this process, not the guard.
        guard = cls(subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARD_SCRIPT],
                                     stdin=subprocess.PIPE, start_new_session=True))
        cls._running.append(guard)
        return guard

    def watch(self, pid: int) -> None:
        self.process.stdin.write(f"{pid}\n".encode())
        self.process.stdin.flush()


# Runs with -I -S: the standard library only, started in milliseconds. A process is the
# one it was told about while its start time (/proc/<pid>/stat field 22) is unchanged.
_GUARD_SCRIPT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)

def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZXx" else fields[19]

def still(pid, start):
    return start is not None and started(pid) == start

watched = {}
for line in sys.stdin.buffer:  # until the pipe ends: the process that started us is gone
    watched[int(line)] = started(int(line))
for pid, start in watched.items():
    if still(pid, start):
        os.kill(pid, signal.SIGTERM)
deadline = time.monotonic() + 10
for pid, start in watched.items():
    while still(pid, start) and time.monotonic() < deadline:
        time.sleep(0.1)
    if still(pid, start):
        os.kill(pid, signal.SIGKILL)
"""


def import_while_waiting(starting: threading.Thread | None, modules: Sequence[str]
                         ) -> list[str]:
    """Import `modules`, in order, for as long as `starting` is still running: what a run
    may need anyway, in time that is otherwise spent waiting. Returns those imported."""
    imported = []
    for module in modules:
        if starting is None or not starting.is_alive():
            break
        importlib.import_module(module)
        imported.append(module)
    return imported


def flow_settings(starting: threading.Thread | None) -> contextlib.AbstractContextManager:
    """Prefect settings for a flow run on the temporary server: no heartbeats. They let a
    server tell a crashed run from a running one, but this server ends with the process;
    at the run's end they cost a wait of up to a second for the heartbeat thread."""
    if starting is None:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
