"""visionops: keeps an image-recognition model fresh in production."""

import atexit
import os
import sys

# Silence TensorFlow's oneDNN/AVX banner before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's temporary server (no PREFECT_API_URL) gets 20 s to start by default; creating
# its database on a fresh machine took 22 s here, so the first retrain failed.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

__version__ = "0.1.0"


_exit_code: int | None = None


def end_without_teardown(code: int | str | None) -> None:
    """Have the process end with `code` once the normal exit has run: threads joined,
    Prefect's logs and events sent, every atexit handler (Prefect's temporary server is
    stopped by one). What it skips is the interpreter's teardown of every loaded module,
    seconds once TensorFlow is loaded. For the `visionops` command only."""
    global _exit_code
    _exit_code = code if isinstance(code, int) else (0 if code is None else 1)


@atexit.register  # first registered (on the first import of visionops), so it runs last
def _end_now() -> None:
    if _exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code)
