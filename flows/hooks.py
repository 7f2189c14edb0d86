"""What happens when a flow run fails or crashes: a readable summary (which step, why)
written under reports/failures/ and, when `notify.webhook_url` is set, posted there as JSON.

A run killed outright (SIGKILL, the OOM killer) cannot report itself. The next run does
(`report_unreported_crashes`): it reports every Crashed run not reported yet, and first
marks Crashed the Running runs whose process on this host is gone. Each time a run enters
Running, `record_process` tags it with its process: hostname, machine id, boot id, PID
namespace, PID and the process's start time; the last such tag is the run's process now
(a retried run gets a new one). A run is judged only on the host that ran it: there, it
is gone if the host restarted since (another boot id) or no process with that PID and
start time exists. On a Prefect server, a run lost with its worker or host is set
Crashed by the server once its heartbeats stop (`crash_runs_whose_heartbeats_stop`), and
the next run then reports it the same way."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import MissingContextError
from prefect.logging import get_logger
from prefect.runtime import flow_run as flow_run_context
from prefect.states import Crashed

from visionops.core.config import DEFAULT_PARAMS, Params, load_params

REPORTED_TAG = "visionops:failure-reported"
PROCESS_TAG_PREFIX = "visionops:process:"
ZOMBIE_AUTOMATION = "visionops: crash runs whose heartbeats stopped"
# The most recent runs looked at by one scan: a backlog beyond it is reported by later runs.
SCAN_LIMIT = 200
# A run that entered Running this recently may not have tagged its new process yet.
TAGGING_GRACE_S = 5.0
UNKNOWN = "-"


def report_failure(flow, flow_run, state) -> None:
    """Prefect on_failure and on_crashed hook: the report file, then the webhook."""
    params = load_params(flow_run.parameters.get("params_path", DEFAULT_PARAMS))
    summary = failure_summary(flow.name, flow_run, state)
    _report(params, summary)
    if state.is_crashed():
        _add_tag(flow_run.id, REPORTED_TAG)


def record_process(flow, flow_run, state) -> None:
    """Prefect on_running hook: tag the run with this process (last among its process
    tags), so that a later run can tell a run whose process is gone from a running one."""
    tag = this_process().tag()
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(flow_run.id).tags  # those set since the run started too
        client.update_flow_run(flow_run.id, tags=[*(t for t in tags if t != tag), tag])


def report_unreported_crashes(params: Params, flow_name: str) -> list[str]:
    """Report, like a failure, every Crashed run of `flow_name` that has not been
    reported, and tag it reported. Before that, a Running run whose process on this host
    is gone is set Crashed. Returns the names of the runs reported. Never fails its
    caller: when the Prefect API cannot be used, it logs a warning and returns the runs
    reported until then (the next run scans again)."""
    logger = _logger()
    reported: list[str] = []
    try:
        _report_unreported_crashes(params, flow_name, reported, logger)
    except Exception as error:  # noqa: BLE001 - a scan must never stop the night's run
        logger.warning("could not look for crashed runs of %s: %s: %s", flow_name,
                       type(error).__name__, error)
    return reported


def _report_unreported_crashes(params: Params, flow_name: str, reported: list[str],
                               logger) -> None:
    here = this_process()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.CRASHED, StateType.RUNNING]))),
            sort=FlowRunSort.START_TIME_DESC, limit=SCAN_LIMIT)
        current = flow_run_context.get_id()  # the run scanning is never judged
        for run in runs:
            if REPORTED_TAG in run.tags or (current and str(run.id) == str(current)):
                continue
            state = run.state
            if state.is_running():
                gone = gone_process(run.tags, here)
                since = time.time() - state.timestamp.timestamp()
                if gone is not None and since < TAGGING_GRACE_S:
                    time.sleep(TAGGING_GRACE_S - since)  # its new process may tag it now
                    run = client.read_flow_run(run.id)
                    state = run.state
                    gone = gone_process(run.tags, here) if state.is_running() else None
                if gone is None:
                    continue
                state = Crashed(message=f"its process ({gone.pid} on {gone.host}) is gone: "
                                        "killed outright (SIGKILL, out of memory) or its "
                                        "host restarted")
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
    """The tasks of the run and of its stages (subflows) that failed, crashed, or were
    still running when it ended."""
    with get_client(sync_client=True) as client:
        stages = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run_id, *(stage.id for stage in stages)])))
    stand_ins = {stage.parent_task_run_id for stage in stages}  # a stage in its parent
    # a task run is named "<task name>-<3 random characters>"
    return [run.name.rsplit("-", 1)[0]
            for run in sorted(task_runs, key=lambda r: r.expected_start_time)
            if run.id not in stand_ins and run.state is not None
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


def this_process() -> RecordedProcess:
    # The boot is the kernel's boot id, not psutil.boot_time(): that one is derived from
    # the wall clock and moves when the clock is set, which would read as a restart and
    # judge a running process gone. psutil knows neither it nor the PID namespace.
    process = psutil.Process()
    return RecordedProcess(host=socket.gethostname(), machine=_read_id("/etc/machine-id"),
                           boot=_read_id("/proc/sys/kernel/random/boot_id"),
                           pid_namespace=_pid_namespace(), pid=process.pid,
                           created=process.create_time())


def _read_id(path: str) -> str:
    try:
        return Path(path).read_text().strip().replace(":", "") or UNKNOWN
    except OSError:
        return UNKNOWN


def _pid_namespace() -> str:
    """On Linux, the PID namespace's inode: two containers of one host see different PIDs."""
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        return UNKNOWN


def is_running(process: RecordedProcess) -> bool:
    """Whether the process recorded (on this host and boot) still runs: a process with
    its PID exists, is no zombie, and started when the recorded one did."""
    try:
        found = psutil.Process(process.pid)
        return (found.status() != psutil.STATUS_ZOMBIE
                and abs(found.create_time() - process.created) <= 1.0)
    except psutil.NoSuchProcess:
        return False


def gone_process(tags: list[str], here: RecordedProcess) -> RecordedProcess | None:
    """The run's process (its last process tag), if it ran on this host and is gone:
    the host restarted since, or it no longer runs. None when it runs, when it ran on
    another host (or container) whose processes cannot be seen from here, or when no
    process was recorded."""
    recorded = last_process(tags)
    if recorded is None or not here.same_host(recorded):
        return None
    if recorded.boot != here.boot:
        # a process never survives a restart of its host; but only the machine id tells
        # a restart from another machine of the same hostname
        known = UNKNOWN not in (recorded.machine, here.machine)
        return recorded if known and recorded.machine == here.machine else None
    if recorded.pid_namespace != here.pid_namespace:
        return None
    return None if is_running(recorded) else recorded


def report_path(root: Path, flow_run_name: str) -> Path:
    return root / "reports" / "failures" / f"{flow_run_name}.md"


def report_markdown(summary: dict) -> str:
    verb = "crashed" if summary["state"] == "Crashed" else "failed"
    return (f"# {summary['flow']} run {summary['flow_run']} {verb}\n\n"
            f"**Flow run id:** `{summary['flow_run_id']}`\n\n"
            f"**Step:** {summary['failed_step']}\n\n"
            f"**Why:**\n\n```\n{summary['reason']}\n```\n")


@dataclass(frozen=True)
class RecordedProcess:
    """A process as a run's tag records it."""
    host: str           # hostname
    machine: str        # /etc/machine-id: tells apart two machines of one hostname
    boot: str           # the kernel's boot id: changes when the host restarts
    pid_namespace: str  # tells apart two containers of one host and hostname
    pid: int
    created: float      # when the process started (seconds since the epoch)

    def tag(self) -> str:
        return (f"{PROCESS_TAG_PREFIX}{self.host}:{self.machine}:{self.boot}:"
                f"{self.pid_namespace}:{self.pid}:{self.created:.2f}")

    def same_host(self, other: RecordedProcess) -> bool:
        """Same hostname, and not two machines known apart by their machine ids."""
        return self.host == other.host and (
            UNKNOWN in (self.machine, other.machine) or self.machine == other.machine)


def parse_process_tag(tag: str) -> RecordedProcess | None:
    if not tag.startswith(PROCESS_TAG_PREFIX):
        return None
    fields = tag.removeprefix(PROCESS_TAG_PREFIX).split(":")
    if len(fields) != 6 or not fields[4].isdigit():
        return None  # a tag of an older format, or not ours
    host, machine, boot, namespace, pid, created = fields
    try:
        return RecordedProcess(host, machine, boot, namespace, int(pid), float(created))
    except ValueError:
        return None


def last_process(tags: list[str]) -> RecordedProcess | None:
    """The process a run recorded last: the one that runs it now, wherever it is."""
    recorded = [process for process in map(parse_process_tag, tags) if process]
    return recorded[-1] if recorded else None
