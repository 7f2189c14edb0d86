"""What happens when a flow run fails or crashes: a readable summary (which step, why)
written under reports/failures/ and, when `notify.webhook_url` is set, posted there as JSON.

A run killed outright (SIGKILL, the OOM killer) cannot report itself. The next run does
(`report_unreported_crashes`): it reports every Crashed run not reported yet, and first
marks Crashed the Running runs whose process on this host is gone (`record_process` tags
each run with its host and PID). On a Prefect server, a run lost with its worker or host
is set Crashed by the server once its heartbeats stop (`crash_runs_whose_heartbeats_stop`),
and the next run then reports it the same way."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from datetime import datetime
from pathlib import Path

import psutil
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger
from prefect.states import Crashed

from visionops.config import DEFAULT_PARAMS, Params, load_params

REPORTED_TAG = "visionops:failure-reported"
PROCESS_TAG_PREFIX = "visionops:process:"
ZOMBIE_AUTOMATION = "visionops: crash runs whose heartbeats stopped"
# The most recent runs looked at by one scan: a backlog beyond it is reported by later runs.
SCAN_LIMIT = 200


def report_failure(flow, flow_run, state) -> None:
    """Prefect on_failure and on_crashed hook: the report file, then the webhook."""
    params = load_params(flow_run.parameters.get("params_path", DEFAULT_PARAMS))
    summary = failure_summary(flow.name, flow_run, state)
    _report(params, summary)
    if state.is_crashed():
        _add_tag(flow_run.id, REPORTED_TAG)


def record_process(flow, flow_run, state) -> None:
    """Prefect on_running hook: tag the run with this host and PID, so that a later run
    can tell a run whose process is gone from one that is still running."""
    _add_tag(flow_run.id, process_tag(this_host(), os.getpid()))


def report_unreported_crashes(params: Params, flow_name: str) -> list[str]:
    """Report, like a failure, every Crashed run of `flow_name` that has not been
    reported, and tag it reported. Before that, a Running run whose process on this host
    is gone is set Crashed. Returns the names of the runs reported."""
    here = this_host()
    logger = _logger()
    reported = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.CRASHED, StateType.RUNNING]))),
            sort=FlowRunSort.START_TIME_DESC, limit=SCAN_LIMIT)
        for run in runs:
            if REPORTED_TAG in run.tags:
                continue
            state = run.state
            if state.is_running():
                gone = gone_process(run.tags, here, run.start_time)
                if gone is None:
                    continue
                state = Crashed(message=f"its process ({gone} on {here}) is gone: killed "
                                        "outright (SIGKILL, out of memory) or its host restarted")
                client.set_flow_run_state(run.id, state, force=True)
            try:
                summary = failure_summary(flow_name, run, state)
                if not _already_reported(params, summary):
                    _report(params, summary)
                _add_tag(run.id, REPORTED_TAG)
            except Exception as error:  # noqa: BLE001 - the next run tries this one again
                logger.warning("could not report crashed run %s: %s", run.name, error)
                continue
            logger.warning("Reported crashed run %s (%s)", run.name, summary["reason"])
            reported.append(run.name)
    return reported


def crash_runs_whose_heartbeats_stop(heartbeat_s: int = 180, missed: int = 3) -> bool:
    """On a Prefect server: create, unless it exists, the automation that sets Crashed a
    flow run that sent no heartbeat (every `heartbeat_s`, PREFECT_FLOWS_HEARTBEAT_FREQUENCY
    on the worker, 180 by default) for `missed` beats, nor ended. A server has no such
    check built in; this is the one Prefect documents ("Detect zombie flows"). The next
    run then reports the crash. Returns whether it was created."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return False
    Automation(
        name=ZOMBIE_AUTOMATION,
        description="Set Crashed a flow run whose process stopped sending heartbeats",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=heartbeat_s * missed)),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {heartbeat_s * missed} s: its process was killed "
                    "outright (SIGKILL, out of memory) or its host was lost")],
    ).create()
    return True


def failed_steps(flow_run_id) -> list[str]:
    """The tasks of the run that failed, crashed, or were still running when it ended."""
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # a task run is named "<task name>-<3 random characters>"
    return [run.name.rsplit("-", 1)[0]
            for run in sorted(task_runs, key=lambda r: r.expected_start_time)
            if run.state is not None
            and (run.state.is_failed() or run.state.is_crashed() or run.state.is_running())]


def failure_summary(flow_name: str, flow_run, state) -> dict:
    if state.is_crashed():
        # A crash has no result to read; its message says what happened.
        reason = state.message or "the run crashed"
    else:
        try:
            state.result()
            reason = state.message or "unknown"
        except BaseException as error:  # noqa: BLE001 - the failure is what we report
            reason = f"{type(error).__name__}: {error}"
    try:
        steps = failed_steps(flow_run.id)
    except Exception as error:  # noqa: BLE001 - the report must still be written
        steps = [f"unknown (the task runs could not be read: {error})"]
    return {"flow": flow_name, "flow_run": flow_run.name, "flow_run_id": str(flow_run.id),
            "state": state.name, "failed_step": steps[-1] if steps else "the flow itself",
            "reason": reason, "parameters": flow_run.parameters}


def _logger():
    try:
        return get_run_logger()  # into the flow run's own log
    except MissingContextError:
        return get_logger("visionops.hooks")


def _report(params: Params, summary: dict) -> None:
    path = report_path(params.root, summary["flow_run"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_markdown(summary))
    if params.notify.webhook_url:
        request = urllib.request.Request(
            params.notify.webhook_url, data=json.dumps(summary, default=str).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError as error:  # a failing webhook must not hide the real failure
            print(f"could not post the failure summary to the webhook: {error}")


def _already_reported(params: Params, summary: dict) -> bool:
    """The report was written but the tag could not be set (the server was down)."""
    path = report_path(params.root, summary["flow_run"])
    return path.is_file() and summary["flow_run_id"] in path.read_text()


def _add_tag(flow_run_id, tag: str) -> None:
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(flow_run_id).tags  # those set since the run started too
        if tag not in tags:
            client.update_flow_run(flow_run_id, tags=[*tags, tag])


def this_host() -> str:
    """This host, and on Linux its PID namespace: two containers may share a hostname."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()}/{namespace.removeprefix('pid:').strip('[]')}"


def gone_process(tags: list[str], host: str, started: datetime | None) -> int | None:
    """The PID a run recorded on `host`, if that process no longer exists (or the PID now
    belongs to a process that started after the run did)."""
    pid = recorded_pid(tags, host)
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE and (
            started is None or process.create_time() <= started.timestamp() + 1)
    except psutil.NoSuchProcess:
        alive = False
    return None if alive else pid


def report_path(root: Path, flow_run_name: str) -> Path:
    return root / "reports" / "failures" / f"{flow_run_name}.md"


def report_markdown(summary: dict) -> str:
    verb = "crashed" if summary["state"] == "Crashed" else "failed"
    return (f"# {summary['flow']} run {summary['flow_run']} {verb}\n\n"
            f"**Flow run id:** `{summary['flow_run_id']}`\n\n"
            f"**Step:** {summary['failed_step']}\n\n"
            f"**Why:**\n\n```\n{summary['reason']}\n```\n")


def process_tag(host: str, pid: int) -> str:
    return f"{PROCESS_TAG_PREFIX}{host}:{pid}"


def recorded_pid(tags: list[str], host: str) -> int | None:
    """The PID recorded by `record_process` on `host`, None if none was recorded there."""
    prefix = f"{PROCESS_TAG_PREFIX}{host}:"
    for tag in tags:
        if tag.startswith(prefix) and tag.removeprefix(prefix).isdigit():
            return int(tag.removeprefix(prefix))
    return None
