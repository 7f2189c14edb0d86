import time

from visionops.ops import processes


def _shell(tmp_path, script: str) -> int:
    pid = processes.start(["sh", "-c", script], tmp_path / "log")
    deadline = time.monotonic() + 10
    while len(processes.group_members(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid


def test_stop_ends_the_whole_process_group(tmp_path):
    pid = _shell(tmp_path, "sleep 60 & sleep 60")
    assert len(processes.group_members(pid)) >= 2  # the shell and its sleeps
    processes.stop(pid, timeout=5)
    assert processes.group_members(pid) == [] and not processes.alive(pid)


def test_stop_ends_with_sigkill_what_ignores_sigint_and_sigterm(tmp_path):
    pid = _shell(tmp_path, "trap '' INT TERM; sleep 60 & wait; sleep 60")
    started = time.monotonic()
    processes.stop(pid, timeout=0.5)
    assert processes.group_members(pid) == []
    assert time.monotonic() - started >= 1  # SIGINT and SIGTERM were each given their time
