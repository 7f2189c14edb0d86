import botocore.exceptions
import pytest
from prefect import flow, task

from tasks.retry import TRANSIENT_RETRIES
from visionops.io.transient import is_transient_error
from visionops.io.validation import DataValidationError, ValidationReport


def test_connection_failures_are_transient_even_when_wrapped():
    assert is_transient_error(ConnectionRefusedError("no server"))
    assert is_transient_error(botocore.exceptions.EndpointConnectionError(endpoint_url="x"))
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError as inner:
            raise RuntimeError("push failed") from inner
    except RuntimeError as wrapped:
        assert is_transient_error(wrapped)


def test_exhausted_http_retries_on_server_errors_are_transient():
    import requests
    from urllib3.exceptions import MaxRetryError, ResponseError

    # MLflow's client, when the artifact proxy answered 500 (its object store was down)
    cause = MaxRetryError(None, "/api/2.0/mlflow-artifacts/artifacts/x",
                          ResponseError("too many 500 error responses"))
    try:
        try:
            raise requests.exceptions.RetryError(cause)
        except requests.exceptions.RetryError as inner:
            raise RuntimeError("could not upload x to the artifacts of MLflow run") from inner
    except RuntimeError as wrapped:
        assert is_transient_error(wrapped)
    assert not is_transient_error(requests.exceptions.HTTPError("403 Forbidden"))


def test_a_dvc_pull_that_could_not_download_files_is_transient(tmp_path, tiny_digits):
    """DVC logs each failed file and raises DownloadError without a cause: a store that
    went away mid-pull looks exactly like this one, whose objects are missing."""
    import shutil

    from dvc.exceptions import DownloadError, UploadError
    from dvc.repo import Repo

    from visionops.io.dataset import pull_dataset, version_dataset

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / ".dvc" / "config").write_text(
        "[core]\n    no_scm = True\n    remote = local\n['remote \"local\"']\n"
        "    url = ../remote\n")
    version_dataset(tiny_digits)
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    shutil.rmtree(tiny_digits)
    for prefix in sorted((tmp_path / "remote" / "files" / "md5").iterdir())[:2]:
        shutil.rmtree(prefix)
    with pytest.raises(DownloadError) as failed:
        pull_dataset(tiny_digits)
    assert failed.value.__cause__ is None and failed.value.__context__ is None
    assert is_transient_error(failed.value)
    assert is_transient_error(UploadError(3))  # as dvc.repo.push raises it


def test_gate_failures_and_bugs_are_not_transient():
    report = ValidationReport(data_dir="d", n_images=0, n_classes=0)
    assert not is_transient_error(DataValidationError(report, facts=None))
    assert not is_transient_error(ValueError("bad value"))
    assert not is_transient_error(FileNotFoundError("data"))


def _flaky(errors: list[BaseException]):
    calls = []

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def step() -> int:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return len(calls)

    @flow
    def run() -> int:
        return step()

    return run, calls


def test_a_transient_fault_is_retried_until_it_clears(prefect_server):
    run, calls = _flaky([ConnectionRefusedError("down"), ConnectionRefusedError("down")])
    assert run() == 3 and len(calls) == 3


def test_a_failed_dvc_transfer_is_retried(prefect_server):
    from dvc.exceptions import UploadError

    run, calls = _flaky([UploadError(2)])
    assert run() == 2 and len(calls) == 2


def test_a_failed_gate_is_not_retried(prefect_server):
    report = ValidationReport(data_dir="d", n_images=0, n_classes=0)
    run, calls = _flaky([DataValidationError(report, facts=None)])
    with pytest.raises(DataValidationError):
        run()
    assert len(calls) == 1


def test_retries_stop_after_three(prefect_server):
    run, calls = _flaky([ConnectionRefusedError("down")] * 10)
    with pytest.raises(ConnectionRefusedError):
        run()
    assert len(calls) == 4
