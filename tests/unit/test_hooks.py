"""The pieces of failure reporting that need no server: the report, the process a run
recorded and whether it is gone, and a timeout on every task and flow."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psutil
import pytest
from prefect import Flow, Task

import flows
import tasks
from flows.hooks import gone_process, process_tag, recorded_pid, report_markdown, this_host


def test_a_report_says_crashed_or_failed_and_names_the_run_step_and_reason():
    summary = {"flow": "retrain", "flow_run": "brave-otter", "flow_run_id": "1234-abcd",
               "state": "Crashed", "failed_step": "Train model", "reason": "its process is gone"}
    crashed = report_markdown(summary)
    assert crashed.startswith("# retrain run brave-otter crashed\n")
    assert "`1234-abcd`" in crashed and "Train model" in crashed
    assert "its process is gone" in crashed
    assert "run brave-otter failed" in report_markdown({**summary, "state": "TimedOut"})


def test_only_the_pid_recorded_on_this_host_counts():
    here = this_host()
    tags = ["nightly", process_tag("another-host", 11), process_tag(here, 42)]
    assert recorded_pid(tags, here) == 42
    assert recorded_pid(tags, "a-third-host") is None
    assert recorded_pid(["nightly", "visionops:process:" + here + ":x"], here) is None


def test_a_process_is_gone_once_it_ended_or_its_pid_serves_a_newer_process():
    here = this_host()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its PID names no process (or, reused, a newer one)
    started = datetime.now(UTC)
    assert gone_process([process_tag(here, ended.pid)], here, started) == ended.pid

    me = [process_tag(here, os.getpid())]
    assert gone_process(me, here, started) is None, "this process is still running"
    born = datetime.fromtimestamp(psutil.Process().create_time(), UTC)
    assert gone_process(me, here, born - timedelta(minutes=5)) == os.getpid(), \
        "a run that started before this process was not run by it"
    assert gone_process([process_tag("another-host", 1)], here, started) is None


def _all_of(package, kind):
    for module in pkgutil.iter_modules(package.__path__):
        loaded = importlib.import_module(f"{package.__name__}.{module.name}")
        for name, value in vars(loaded).items():
            if isinstance(value, kind) and value.__module__ == loaded.__name__:
                yield f"{loaded.__name__}.{name}", value


@pytest.mark.parametrize("package", [tasks, flows], ids=["tasks", "flows"])
def test_every_task_and_flow_has_a_timeout(package):
    found = [*_all_of(package, Task), *_all_of(package, Flow)]
    assert found
    assert [name for name, step in found if not step.timeout_seconds] == []
