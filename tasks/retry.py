"""Retries for transient faults only: a tracking server or object store that is
unreachable for a moment. A failed data gate or evaluation gate is never retried."""

from __future__ import annotations

from prefect.tasks import exponential_backoff


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def is_transient_error(error: BaseException) -> bool:
    """True for connection failures, time-outs and DVC's failed file transfers, however
    deep in the cause chain."""
    import botocore.exceptions
    import requests
    from dvc.exceptions import FileTransferError

    # RetryError: the HTTP client's own retries on 429/5xx ran out (MLflow's artifact
    # proxy answers 500 while its object store is down).
    transient = (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout,
                 requests.exceptions.RetryError,
                 botocore.exceptions.EndpointConnectionError,
                 botocore.exceptions.ConnectionClosedError,
                 botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError,
                 # DVC's UploadError and DownloadError: "N files failed to upload/download".
                 # DVC logs each file's cause and raises without one: a store that went away
                 # cannot be told from a missing object, so both get the three retries.
                 FileTransferError)
    return any(isinstance(cause, transient) or "Connection refused" in str(cause)
               for cause in _causes(error))


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
