"""A non-blocking exclusive lock on a file, which the OS releases when its holder dies,
so that a killed run never blocks the next one."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created 0600 if need be) for the block if nobody
    else holds it: True; False when another open file, in this process or any other,
    holds it, or when its folder was removed meanwhile."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except FileNotFoundError:  # removed by another cleaner meanwhile
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claimed = False
        else:
            claimed = True
        yield claimed
    finally:
        os.close(fd)  # closing releases the lock
