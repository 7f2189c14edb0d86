"""Start-up work side by side. Before its first step a retrain waits seconds for Prefect's
temporary server (no PREFECT_API_URL) and spends seconds importing TensorFlow,
great-expectations and the flow. The server is a separate process, so start it first and
import while it comes up; on 2 cores the two then take the time of the longer one."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Sequence


def start_prefect_server() -> threading.Thread | None:
    """Start the temporary server the flow's first API call would start (Prefect's own
    SubprocessASGIServer, a per-process singleton the flow then finds running), in a
    thread that ends once the server answers. None when PREFECT_API_URL names a server.
    Join the thread before the flow starts: until the server answers, the flow would
    find it marked running and call it too early."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.server.api.server import SubprocessASGIServer

    ensure_logging_setup()  # so its "Starting temporary server on <url>" line is shown
    # If it fails here, the flow's own start() tries again and raises Prefect's error.
    starting = threading.Thread(target=SubprocessASGIServer().start, daemon=True,
                                name="prefect-temporary-server")
    starting.start()
    return starting


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
