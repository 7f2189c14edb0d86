"""The pieces of failure reporting that need no server: the report, the process a run
recorded and whether it is gone, and a timeout on every task and flow."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from dataclasses import replace

import pytest
from prefect import Flow, Task
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows
import tasks
from flows.hooks import (
    gone_process,
    last_process,
    report_markdown,
    report_unreported_crashes,
    this_process,
)
from visionops.core.config import load_params


def test_a_report_says_crashed_or_failed_and_names_the_run_step_and_reason():
    summary = {"flow": "retrain", "flow_run": "brave-otter", "flow_run_id": "1234-abcd",
               "state": "Crashed", "failed_step": "Train model", "reason": "its process is gone"}
    crashed = report_markdown(summary)
    assert crashed.startswith("# retrain run brave-otter crashed\n")
    assert "`1234-abcd`" in crashed and "Train model" in crashed
    assert "its process is gone" in crashed
    assert "run brave-otter failed" in report_markdown({**summary, "state": "TimedOut"})


def test_the_last_process_tag_counts_and_round_trips():
    here = this_process()
    older = replace(here, pid=11, created=here.created - 3600)
    tags = ["nightly", older.tag(), here.tag(), "visionops:process:old-format/4026531836:42"]
    assert last_process(tags) == replace(here, created=round(here.created, 2))
    assert last_process(["nightly", "visionops:process:host:m:b:ns:x:1.0"]) is None
    assert gone_process(tags, here) is None, "retried in this process: the dead one is past"
    assert gone_process([here.tag(), older.tag()], here) == older


def test_a_process_is_gone_once_it_ended_or_its_pid_serves_another_process():
    here = this_process()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its PID names no process (or, reused, a newer one)
    dead = replace(here, pid=ended.pid)
    assert gone_process([dead.tag()], here) == last_process([dead.tag()])
    assert gone_process([here.tag()], here) is None, "this process is still running"
    reused = replace(here, created=here.created - 300)  # its PID, another start time
    assert gone_process([reused.tag()], here) == last_process([reused.tag()])


def test_only_a_process_of_this_host_is_judged_and_a_restart_ends_it():
    here = this_process()
    dead_pid = 2**22 + 1  # above any pid_max: no such process
    elsewhere = [replace(here, host="another-host", pid=dead_pid),
                 replace(here, machine="f" * 32, pid=dead_pid),  # same hostname, other machine
                 replace(here, pid_namespace="1", pid=dead_pid)]  # another container
    for process in elsewhere:
        assert gone_process([process.tag()], here) is None, process
    restarted = replace(here, boot="00000000-0000-0000-0000-000000000000")
    assert gone_process([restarted.tag()], here) == last_process([restarted.tag()]), \
        "this host booted again since: even this very PID is another process"
    unknown_machine = replace(restarted, machine="-")  # a restart, or another machine?
    assert gone_process([unknown_machine.tag()], here) is None


def test_a_crash_scan_that_cannot_reach_prefect_warns_and_never_fails(tmp_path, caplog):
    (tmp_path / "params.yaml").write_text("{}\n")
    params = load_params(tmp_path / "params.yaml")

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):  # nothing listens
        assert report_unreported_crashes(params, "retrain") == []

    assert "could not look for crashed runs of retrain: ConnectError" in caplog.text


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
