"""Which failures are transient: a tracking server or object store unreachable for a
moment. Prefect retries those (tasks.retry); nothing else is retried."""

from __future__ import annotations


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
