"""What happens when a flow run fails: a readable summary (which step, why) written
under reports/failures/ and, when `notify.webhook_url` is set, posted there as JSON."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from visionops.config import DEFAULT_PARAMS, load_params


def failed_steps(flow_run_id) -> list[str]:
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # a task run is named "<task name>-<3 random characters>"
    return [run.name.rsplit("-", 1)[0]
            for run in sorted(task_runs, key=lambda r: r.expected_start_time)
            if run.state is not None and (run.state.is_failed() or run.state.is_crashed())]


def failure_summary(flow_name: str, flow_run, state) -> dict:
    try:
        state.result()
        reason = state.message or "unknown"
    except BaseException as error:  # noqa: BLE001 - the failure is what we report
        reason = f"{type(error).__name__}: {error}"
    steps = failed_steps(flow_run.id)
    return {"flow": flow_name, "flow_run": flow_run.name, "flow_run_id": str(flow_run.id),
            "failed_step": steps[-1] if steps else "the flow itself", "reason": reason,
            "parameters": flow_run.parameters}


def report_failure(flow, flow_run, state) -> None:
    """Prefect on_failure hook."""
    params = load_params(flow_run.parameters.get("params_path", DEFAULT_PARAMS))
    summary = failure_summary(flow.name, flow_run, state)
    folder = params.root / "reports" / "failures"
    folder.mkdir(parents=True, exist_ok=True)
    text = (f"# {summary['flow']} run {summary['flow_run']} failed\n\n"
            f"**Step:** {summary['failed_step']}\n\n**Why:**\n\n```\n{summary['reason']}\n```\n")
    Path(folder / f"{flow_run.name}.md").write_text(text)
    if params.notify.webhook_url:
        request = urllib.request.Request(
            params.notify.webhook_url, data=json.dumps(summary, default=str).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except OSError as error:  # a failing webhook must not hide the real failure
            print(f"could not post the failure summary to the webhook: {error}")
