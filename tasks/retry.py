"""Retries for transient faults only: a tracking server or object store that is
unreachable for a moment. A failed data gate or evaluation gate is never retried."""

from __future__ import annotations

from prefect.tasks import exponential_backoff

from visionops.io.transient import is_transient_error


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only when the failure was transient."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - classifying is the point
        return is_transient_error(error)
    return False


# Three more tries, 2 s, 4 s, 8 s apart (with jitter), for transient faults only.
TRANSIENT_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}
