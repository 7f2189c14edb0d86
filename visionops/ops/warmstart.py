"""Start-up work side by side. Before its first step a retrain waits seconds for a Prefect
server and spends seconds importing TensorFlow, great-expectations and the flow. Without
PREFECT_API_URL the `visionops` command starts a temporary server of its own first, with
`prefect server start`, and imports while it comes up; on 2 cores the two then take the
time of the longer one."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence

import psutil

from visionops.ops.objectstore import free_port

# PREFECT_API_URL names this process's temporary server when it equals this variable: no
# server shared with others (visionops.io.locks.prefect_server_url tells the two apart).
TEMPORARY_API_URL = "VISIONOPS_TEMPORARY_PREFECT_API_URL"

# What Prefect's own temporary server runs without: the UI, and the services a server
# shared by many runs and workers needs (schedules, late runs, workers' health, leases,
# cancellations). The temporary server works on the Prefect home's database, which a
# `prefect server start` of the user's may share.
SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CLEANUP_RECONCILER_ENABLED": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "ERROR",
    "PREFECT_CLI_PROMPT": "false",
}
LAUNCHES = 3  # a server that exits before it answers (its port taken meanwhile) is relaunched


def start_prefect_server() -> TemporaryServer | None:
    """Start the temporary server, unless PREFECT_API_URL names a server (then None).
    Call `wait()` on it before the flow starts: it then answers, and PREFECT_API_URL
    names it in this process and the processes it starts."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    return TemporaryServer.start(settings.server.ephemeral.startup_timeout_seconds)


class TemporaryServer:
    """A Prefect server for this process alone: `prefect server start` on a free port of
    127.0.0.1, on the Prefect home's database, as Prefect's own temporary server (so a
    later run's crash scan and a later `prefect server start` see its runs). It stops at
    this process's exit, and a `ServerGuard` stops it when this process is killed outright.
    Its own session: a Ctrl-C at the terminal stops this process, whose hooks still report
    to the server, and then the server."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.api_url = ""
        self.error: Exception | None = None
        self._stopped = False
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - its banner, or why it failed
        self._guard = ServerGuard.start()
        self._waiting = threading.Thread(target=self._wait_until_answering, daemon=True,
                                         name="prefect-temporary-server")

    @classmethod
    def start(cls, timeout_s: float) -> TemporaryServer:
        from prefect.logging import get_logger
        from prefect.logging.configuration import ensure_logging_setup

        server = cls(timeout_s)
        server._launch()
        atexit.register(server.stop)
        server._waiting.start()
        ensure_logging_setup()
        get_logger("visionops").info("Starting temporary server on %s",
                                     server.api_url.removesuffix("/api"))
        return server

    def _launch(self) -> None:
        from prefect.settings import get_current_settings

        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               **SERVER_SETTINGS}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port)],
            env=env, stdin=subprocess.DEVNULL, stdout=self._output, start_new_session=True)
        if self._guard is not None:
            self._guard.watch(self.process.pid)

    def starting(self) -> bool:
        return self._waiting.is_alive()

    def wait(self) -> None:
        """Until the server answers; then PREFECT_API_URL names it, for this process (every
        thread) and those it starts. RuntimeError if it never answered."""
        self._waiting.join()
        if self.error is not None:
            raise self.error
        from prefect.context import refresh_global_settings_context

        os.environ["PREFECT_API_URL"] = os.environ[TEMPORARY_API_URL] = self.api_url
        os.environ.setdefault("PREFECT_UI_URL", "")  # it has none: no "View at" links
        refresh_global_settings_context()

    def _wait_until_answering(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout_s
            launches = 1
            while not self._answering():
                if self.process.poll() is not None:
                    if self._stopped:
                        raise RuntimeError("Prefect's temporary server was stopped")
                    if launches == LAUNCHES:
                        raise RuntimeError(f"Prefect's temporary server exited with code "
                                           f"{self.process.returncode}: {self._said()}")
                    self._launch()
                    launches += 1
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"Prefect's temporary server did not answer within "
                                       f"{self.timeout_s:.0f} s (PREFECT_SERVER_EPHEMERAL_"
                                       f"STARTUP_TIMEOUT_SECONDS): {self._said()}")
                time.sleep(0.1)
        except Exception as error:  # noqa: BLE001 - raised by wait(), in the caller's thread
            self.error = error

    def _answering(self) -> bool:
        """Its health check answers, and from our process: not another on the same port."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                if response.status != 200:
                    return False
        except OSError:
            return False
        try:
            return any(connection.laddr.port == self.port
                       and connection.status == psutil.CONN_LISTEN
                       for connection in psutil.Process(self.process.pid).net_connections())
        except psutil.NoSuchProcess:
            return False

    def _said(self) -> str:
        self._output.seek(0)
        return self._output.read()[-2000:].decode(errors="replace").strip()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s (what Prefect does with its own)."""
        self._stopped = True
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._guard is not None:
            self._guard.stop()  # nothing of ours is left once this process ends


class ServerGuard:
    """A small process that ends the processes it watches once this one is gone, however
    it ended. The server is stopped at exit, which a process killed outright (SIGKILL, the
    OOM killer) never reaches. The guard holds the read end of a pipe whose only write end
    is this process's: when this process is gone the read ends, and the guard stops each
    watched process (SIGTERM, SIGKILL after 10 s) that is still the one it was told about,
    then exits. POSIX only."""

    _running: list[ServerGuard] = []  # kept: closing the pipe is what stops the server

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def start(cls) -> ServerGuard | None:
        if os.name != "posix":
            return None
        # Its own session: a Ctrl-C at the terminal stops this process, not the guard.
        guard = cls(subprocess.Popen([sys.executable, "-I", "-c", _GUARD_SCRIPT],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     start_new_session=True))
        cls._running.append(guard)
        return guard

    def watch(self, pid: int) -> None:
        self.process.stdin.write(f"{pid}\n".encode())
        self.process.stdin.flush()

    def stop(self) -> None:
        """End the guard as this process's end would (what it watches is stopped first)."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# psutil knows a process by its PID and start time: a PID reused meanwhile is left alone.
_GUARD_SCRIPT = """
import signal, sys
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)

watched = []
for line in sys.stdin.buffer:  # until the pipe ends: the process that started us is gone
    try:
        watched.append(psutil.Process(int(line)))
    except psutil.NoSuchProcess:
        pass
for process in watched:
    try:
        process.terminate()
    except psutil.NoSuchProcess:
        pass
for process in psutil.wait_procs(watched, timeout=10)[1]:
    try:
        process.kill()
    except psutil.NoSuchProcess:
        pass
"""


def import_while_waiting(server: TemporaryServer | None, modules: Sequence[str]
                         ) -> list[str]:
    """Import `modules`, in order, for as long as `server` is still starting: what a run
    may need anyway, in time that is otherwise spent waiting. Returns those imported."""
    imported = []
    for module in modules:
        if server is None or not server.starting():
            break
        importlib.import_module(module)
        imported.append(module)
    return imported


def flow_settings(server: TemporaryServer | None) -> contextlib.AbstractContextManager:
    """Prefect settings for a flow run on the temporary server: no heartbeats. They let a
    server tell a crashed run from a running one, but this server ends with the process;
    at the run's end they cost a wait of up to a second for the heartbeat thread."""
    if server is None:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
