"""Background servers started in their own process group, tracked by PID and stopped by
it: the local stack's object store, MLflow and Prefect, and the tests' servers.

A PID alone names whatever process holds it now: after a reboot or a crash, another
program's. So each start also records an `Identity` (boot, start time, command line), and
nothing is reported running, sent a signal or trusted with a password unless it matches."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

# SIGINT first: a Prefect worker ignores SIGTERM while its server is down. SIGKILL last:
# SeaweedFS can hang in its graceful shutdown.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# psutil's create_time is the boot time plus the kernel's start tick: whole clock ticks,
# and the boot time it adds moves a little with the wall clock.
START_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class Identity:
    """What tells a process apart from a later one given the same PID."""
    boot: str
    created: float
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, pid: int, settle_s: float = 2.0) -> Identity:
        """`pid`'s identity. Just after a start the kernel can show an empty command line
        for a moment: read again for up to `settle_s` until it shows one."""
        process = psutil.Process(pid)
        deadline = time.monotonic() + settle_s
        while not (cmdline := process.cmdline()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return cls(_boot_id(), process.create_time(), tuple(cmdline))

    @classmethod
    def from_dict(cls, saved: dict) -> Identity:
        return cls(saved["boot"], float(saved["created"]), tuple(saved["cmdline"]))

    def to_dict(self) -> dict:
        return {**asdict(self), "cmdline": list(self.cmdline)}

    def matches(self, pid: int) -> bool:
        """True only if `pid` is, now, the very process this was taken from."""
        try:
            now = Identity.of(pid, settle_s=0)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return bool(self.cmdline) and (now.boot == self.boot and now.cmdline == self.cmdline
                and abs(now.created - self.created) <= START_TIME_TOLERANCE_S)


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:  # not Linux: the boot time stands in for it
        return str(int(psutil.boot_time()))


def start(command: Sequence[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> int:
    """Start `command` detached in a new session (it outlives its caller); output to `log`,
    which only its owner can read (servers log their settings)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "ab") as output:
        process = subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                   start_new_session=True)
    return process.pid


def listens_on(pgid: int, port: int) -> bool:
    """True if a process of the group `pgid` leads holds the listening socket of `port` on
    loopback: the server just started answers there, not a process squatting the port."""
    for pid in group_members(pgid):
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
               for connection in connections):
            return True
    return False


def alive(pid: int) -> bool:
    """True while the process runs (a zombie child of ours is reaped and counts as gone)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    """The live processes in a process group (the server and the workers it forked)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if (os.getpgid(process.pid) == pgid
                    and process.info["status"] != psutil.STATUS_ZOMBIE):
                members.append(process.pid)
        except ProcessLookupError:  # it ended meanwhile
            continue
    return members


def owns(identity: Identity, pid: int) -> bool:
    """True if the group `pid` leads is the one started with `identity`: its leader is,
    or its leader is gone and its workers are left (the kernel does not hand out a
    process group's number again while the group has members)."""
    if identity.matches(pid):
        return True
    return identity.boot == _boot_id() and not alive(pid) and bool(group_members(pid))


def stop(pid: int, timeout: float = 10, identity: Identity | None = None) -> bool:
    """Stop the process group `pid` leads: SIGINT, then SIGTERM, then SIGKILL, each
    given `timeout` seconds, until no process of the group is left. With `identity`, a
    `pid` now held by another process is not signalled at all: False."""
    if identity is not None and not owns(identity, pid):
        return False
    for sig in STOP_SIGNALS:
        if not group_members(pid) and not alive(pid):
            return True
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive(pid)  # reaps it when it is our child
            if not group_members(pid):
                return True
            time.sleep(0.1)
    return True
