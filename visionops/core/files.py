"""Files written whole or not at all: a temporary file beside the target, flushed to disk,
then renamed over it. A kill at any point leaves the old file or the new one, never half."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, content: str | bytes, mode: int = 0o600) -> None:
    """Replace `path` with `content`; the file has `mode` from its first byte on, whatever
    mode an earlier file there had. A symlink at `path` is replaced, never followed."""
    data = content.encode() if isinstance(content, str) else content
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(descriptor, mode)  # the umask may have narrowed it; never widened
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def private_folder(path: Path) -> Path:
    """Create `path` (and its parents) if missing and make it 0700: only its owner lists
    or enters it. A symlink there is refused: its target would get the secrets."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:  # opened without following a link, so the mode is set on this very folder
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise PermissionError(f"{path} is a symlink; refusing to keep secrets behind it"
                                  ) from exc
        raise
    try:
        os.fchmod(descriptor, 0o700)
    finally:
        os.close(descriptor)
    return path
