"""`visionops serve-model` for real: one uvicorn server process for the module, over a
SQLite MLflow store holding two different tiny versions and one that carries a pickle,
asked over HTTP. It answers as `visionops predict` does, follows the alias through a
promotion and a rollback without failing a request, refuses bad input with the reason
and goes on, counts everything in /metrics and copies unsure images for review."""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from projects import write_params
from prometheus_client.parser import text_string_to_metric_families
from tiny_versions import VISIONOPS, Registration, ServingProcess

from visionops.core.config import load_params
from visionops.core.demo import write_digits
from visionops.io.feedback import review_name
from visionops.io.registry import Registry

MODEL = "serving-tiny"
THRESHOLD = 0.43  # splits v1's answers on these images (checked)
LIMITS = {"poll_seconds": 0.2, "max_batch": 16, "batch_wait_ms": 5, "max_concurrency": 34,
          "max_images_per_request": 4, "max_image_bytes": 2000, "summary_seconds": 1}
TOLERANCE = 1e-5


@dataclass
class Service:
    server: ServingProcess
    registry: Registry
    answers: dict[str, dict[str, dict]]  # version -> image name -> visionops predict's row
    images: dict[str, Path]              # name -> file
    unsafe: str
    marker: Path
    review: Path
    before_load: dict[str, httpx.Response]
    cli: subprocess.Popen                # `visionops predict --json` of every image, on v1

    def post(self, **request) -> httpx.Response:
        return httpx.post(self.server.url + "/predict", timeout=30, **request)

    def files(self, names: list[str]) -> list[tuple]:
        return [("files", (name, self.images[name].read_bytes(), "image/png")) for name in names]

    def metrics(self) -> dict[tuple, float]:
        text = self.server.get("/metrics").text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    write_digits(root / "images", per_class=3, labels=range(4))
    params_file = write_params(root, {
        "data": {"image_size": 8, "channels": 1}, "registry": {"model_name": MODEL},
        "mlflow": {"experiment_name": "serving"}, "serving": LIMITS,
        "feedback": {"confidence_threshold": THRESHOLD, "review_dir": "review"}})
    marker = root / "code-ran"
    registration = Registration(params_file, root / "images", unsafe_marker=marker)
    registry = Registry(load_params(params_file))
    registry.client.search_experiments()  # creates the store while the registration imports
    registration.go()
    server = ServingProcess(params_file, root / "server.log")  # starts beside the registration
    cli = None
    try:
        registered = registration.result()
        server.wait_for(lambda: server.get("/health").status_code == 200, "/health")
        before_load = {path: server.get(path) for path in ("/health", "/ready", "/version")}
        images = {path.name: path for path in sorted((root / "images").rglob("*.png"))}
        first = next(iter(images.values()))
        before_load["/predict"] = httpx.post(server.url + "/predict", timeout=30, files=[
            ("files", (first.name, first.read_bytes(), "image/png"))])
        registry.promote("1", "first served", "serving-tests")
        server.wait_version("1")
        cli = subprocess.Popen([str(VISIONOPS), "predict", "--json", "--params",
                                str(params_file), *map(str, images.values())],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        yield Service(server, registry, registered["answers"], images, registered["unsafe"],
                      marker, root / "review", before_load, cli)
    finally:
        server.stop()
        registration.stop()
        if cli is not None and cli.poll() is None:
            cli.kill()
            cli.communicate()


def test_health_answers_at_once_and_ready_waits_for_the_first_load(service):
    before = service.before_load
    assert before["/health"].json() == {"status": "loading"}
    assert before["/ready"].status_code == 503 and before["/ready"].json() == {
        "status": "loading"}
    assert before["/version"].status_code == 503
    assert before["/predict"].status_code == 503
    assert before["/predict"].json()["error"] == "loading"
    assert before["/predict"].headers["Retry-After"] == "1"

    assert service.server.get("/health").json() == {"status": "ready"}
    assert service.server.get("/ready").json() == {"status": "ready"}
    version = service.server.get("/version").json()
    run_id = service.registry.version("1").run_id
    assert version.pop("loaded_at")
    assert version == {"model_name": MODEL, "model_version": "1", "data_version": "tiny-1",
                       "run_id": run_id, "alias": "champion"}


def _versions_disagree(answers: dict) -> bool:
    return any(answers["1"][n]["label"] != answers["2"][n]["label"] for n in answers["1"])


def test_promotion_and_rollback_are_followed_without_a_failed_request(service):
    assert _versions_disagree(service.answers)  # else the labels could not tell them apart
    server, names = service.server, list(service.images)
    answered, failed, stop = [], [], threading.Event()

    def client(seed: int) -> None:
        pick = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                chosen = pick.sample(names, pick.randint(1, 4))
                try:
                    answer = http.post("/predict", files=service.files(chosen))
                except httpx.HTTPError as exc:
                    failed.append(repr(exc))
                    continue
                if answer.status_code != 200:
                    failed.append(f"{answer.status_code} {answer.text}")
                    continue
                answered.append((chosen, answer.json()))

    def versions() -> list[str]:
        return [body["model_version"] for _, body in list(answered)]

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in clients:
        thread.start()
    try:
        server.wait_for(lambda: "1" in versions(), "an answer of v1")
        service.registry.promote("2", "a newer version", "serving-tests")
        server.wait_for(lambda: "2" in versions(), "an answer of v2")
        service.registry.rollback("back to v1", "serving-tests")
        server.wait_for(lambda: "1" in versions()[versions().index("2"):], "v1 again")
        seen = len(answered)
        server.wait_for(lambda: len(answered) > seen + 8, "more answers")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)

    assert failed == []
    served = versions()
    assert served[0] == "1" and "2" in served and served[-1] == "1"
    assert set(served) == {"1", "2"}
    for chosen, body in answered:  # each request answered whole by the version it names
        own = service.answers[body["model_version"]]
        assert [p["name"] for p in body["predictions"]] == chosen
        assert [p["label"] for p in body["predictions"]] == [own[n]["label"] for n in chosen]
        for name, prediction in zip(chosen, body["predictions"], strict=True):
            assert abs(prediction["probability"] - own[name]["probability"]) < TOLERANCE


def test_a_version_that_cannot_be_loaded_leaves_the_champion_serving(service):
    server, unsafe = service.server, service.unsafe
    failures = value(service.metrics(), "visionops_serving_model_loads_total", outcome="failed")
    service.registry.promote(unsafe, "carries a pickle", "serving-tests")
    try:
        server.wait_for(lambda: value(service.metrics(), "visionops_serving_model_loads_total",
                                      outcome="failed") > failures, "a failed load counted")
        assert server.get("/version").json()["model_version"] == "1"
        answer = service.post(files=service.files(list(service.images)[:2]))
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
        assert re.search(rf"v{unsafe} not loaded, still serving v1: .*refused to load",
                         server.output())
        assert not service.marker.exists()
    finally:
        service.registry.rollback("back from the unsafe version", "serving-tests")
    assert server.get("/version").json()["model_version"] == "1"


def _big() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(2500)


def _b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


# name: (the request, given a good PNG's bytes), status, error, a text the detail names
BAD_INPUTS = {
    "not an image": (lambda png: {"files": [("files", ("notes.txt", b"just text", "text/plain"))]},
                     400, "not_an_image", "notes.txt"),
    "an empty file": (lambda png: {"files": [("files", ("empty.png", b"", "image/png"))]},
                      400, "not_an_image", "empty.png"),
    "a cut-off image": (lambda png: {"files": [("files", ("cut.png", png[:40], "image/png"))]},
                        400, "not_an_image", "cut.png"),
    "bad base64": (lambda png: {"json": [_b64(png), "not base64!"]}, 400, "bad_base64",
                   "image-1"),
    "a too large image": (lambda png: {"files": [("files", ("big.png", _big(), "image/png"))]},
                          413, "image_too_large", "big.png"),
    "a too large base64 image": (lambda png: {"json": [_b64(_big())]}, 413, "image_too_large",
                                 "image-0"),
    "a too large body": (lambda png: {"content": b"-" * 30_000, "headers": {
        "Content-Type": "multipart/form-data; boundary=x"}}, 413, "body_too_large", "larger"),
    "too many files": (lambda png: {"files": [("files", (f"{i}.png", png, "image/png"))
                                              for i in range(5)]},
                       413, "too_many_images", "max_images_per_request"),
    "too many base64 images": (lambda png: {"json": [_b64(png)] * 5}, 413, "too_many_images",
                               "max_images_per_request"),
    "the wrong field": (lambda png: {"files": [("file", ("a.png", png, "image/png"))]},
                        422, "wrong_field", "'files'"),
    "no files": (lambda png: {"files": [("note", (None, b"hello"))]}, 422, "wrong_field",
                 "'files'"),
    "text in the files field": (lambda png: {"files": [("files", (None, b"hello"))]},
                                422, "wrong_field", "'files'"),
    "plain text": (lambda png: {"content": b"hello", "headers": {"Content-Type": "text/plain"}},
                   415, "unsupported_media_type", "multipart/form-data"),
    "a url-encoded form": (lambda png: {"data": {"files": "x"}}, 415, "unsupported_media_type",
                           "multipart/form-data"),
    "not JSON": (lambda png: {"content": b"[", "headers": {"Content-Type": "application/json"}},
                 400, "bad_json", "not JSON"),
    "JSON of another shape": (lambda png: {"json": {"pictures": []}}, 422, "bad_json",
                              "base64"),
    "no images": (lambda png: {"json": []}, 422, "no_images", "'files'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_with_its_reason_and_the_service_goes_on(service, case):
    request, status, error, named = BAD_INPUTS[case]
    good = list(service.images)[0]
    before = value(service.metrics(), "visionops_serving_errors_total", reason=error)
    answer = service.post(**request(service.images[good].read_bytes()))
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == error
    assert named in answer.json()["detail"]
    assert value(service.metrics(), "visionops_serving_errors_total", reason=error) == before + 1
    after = service.post(files=service.files([good]))
    assert after.status_code == 200
    assert after.json()["predictions"][0]["label"] == service.answers["1"][good]["label"]


def test_metrics_count_the_traffic(service):
    names = list(service.images)[4:8]
    before = service.metrics()
    assert service.post(files=service.files(names)).status_code == 200
    assert service.post(files=[("files", ("x.txt", b"x", "text/plain"))]).status_code == 400
    service.server.wait_for(lambda: value(
        service.metrics(), "visionops_serving_requests_total", endpoint="/predict",
        status="400") > value(before, "visionops_serving_requests_total",
                              endpoint="/predict", status="400"), "the requests counted")
    after = service.metrics()

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("visionops_serving_requests_total", endpoint="/predict", status="200") == 1
    assert grew("visionops_serving_requests_total", endpoint="/predict", status="400") == 1
    assert grew("visionops_serving_request_seconds_count", endpoint="/predict") == 2
    assert grew("visionops_serving_errors_total", reason="not_an_image") == 1
    assert grew("visionops_serving_images_predicted_total") == 4
    labels = Counter(service.answers["1"][name]["label"] for name in names)
    for label in ["0", "1", "2", "3"]:
        assert grew("visionops_serving_predictions_total", label=label) == labels[label]
    assert grew("visionops_serving_batch_images_sum") == 4
    assert grew("visionops_serving_batch_images_count") >= 1
    assert value(after, "visionops_serving_model_version") == 1
    assert value(after, "visionops_serving_model_info", model_name=MODEL, version="1",
                 data_version="tiny-1", run_id=service.registry.version("1").run_id) == 1
    assert value(after, "visionops_serving_model_loads_total", outcome="loaded") >= 1


def test_unsure_predictions_are_copied_for_review_off_the_request_path(service):
    v1, v2 = service.answers["1"], service.answers["2"]
    unsure = {name for name, row in v1.items() if row["probability"] < THRESHOLD}
    assert unsure and unsure != set(v1)  # the threshold splits the images
    assert all(abs(row["probability"] - THRESHOLD) > 1e-3 for row in v1.values())

    def copy_of(name: str, answers: dict) -> tuple[str, str]:
        content = service.images[name].read_bytes()
        return answers[name]["label"], review_name(name, content, "PNG")

    names = list(service.images)
    for start in range(0, len(names), 4):
        assert service.post(files=service.files(names[start:start + 4])).status_code == 200
    expected = {copy_of(name, v1) for name in unsure}

    def copies() -> set[tuple[str, str]]:
        return {(path.parent.name, path.name) for path in service.review.rglob("*")
                if path.is_file()}

    service.server.wait_for(lambda: expected <= copies(), "the review copies")
    # Nothing else: only unsure answers, of v1 or of v2 while it served, also of images
    # sent as base64 (named image-<i>): compared on label and content hash.
    def content_of(copies: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(label, name.rsplit("-", 1)[1]) for label, name in copies}

    allowed = expected | {copy_of(name, v2) for name, row in v2.items()
                          if row["probability"] < THRESHOLD}
    assert content_of(copies()) <= content_of(allowed)
    assert value(service.metrics(), "visionops_serving_review_copies_total",
                 outcome="copied") >= len(expected)


def test_requests_that_arrive_together_are_predicted_together(service):
    names, clients = list(service.images), 32
    before = service.metrics()
    start, answers = threading.Barrier(clients), []

    def one(index: int) -> None:
        with httpx.Client(base_url=service.server.url, timeout=30) as http:
            start.wait()
            answers.append(http.post("/predict", files=service.files([names[index % 12]])))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [answer.status_code for answer in answers] == [200] * clients
    after = service.metrics()
    images = value(after, "visionops_serving_batch_images_sum") - value(
        before, "visionops_serving_batch_images_sum")
    calls = value(after, "visionops_serving_batch_images_count") - value(
        before, "visionops_serving_batch_images_count")
    assert images == clients
    assert calls < clients  # some model calls answered several requests


def test_requests_past_max_concurrency_get_503_with_retry_after(service):
    limit, release = LIMITS["max_concurrency"], threading.Event()
    good = list(service.images)[0]
    body = f'["{_b64(service.images[good].read_bytes())}"]'.encode()
    answers = []

    def slow_body():
        yield body[:10]
        release.wait(60)
        yield body[10:]

    def slow_client() -> None:
        try:
            answers.append(service.post(content=slow_body(),
                                        headers={"Content-Type": "application/json"}))
        except httpx.HTTPError as exc:
            answers.append(exc)

    slow = [threading.Thread(target=slow_client) for _ in range(limit)]
    for thread in slow:
        thread.start()
    try:
        service.server.wait_for(lambda: value(service.metrics(),
                                              "visionops_serving_predict_in_progress") == limit,
                                f"{limit} requests in progress")
        refused = service.post(files=service.files([good]))
    finally:
        release.set()
        for thread in slow:
            thread.join(timeout=60)
    assert refused.status_code == 503
    assert refused.json()["error"] == "overloaded" and refused.headers["Retry-After"] == "1"
    assert [getattr(answer, "status_code", answer) for answer in answers] == [200] * limit
    assert value(service.metrics(), "visionops_serving_predict_in_progress") == 0
    assert service.post(files=service.files([good])).status_code == 200


def test_answers_equal_visionops_predict_on_the_same_files(service):
    out, err = service.cli.communicate(timeout=300)
    assert service.cli.returncode == 0, err[-3000:]
    cli = json.loads(out.strip().splitlines()[-1])
    assert cli["champion_version"] == "1"
    expected = {Path(row["path"]).name: row for row in cli["predictions"]}
    assert expected.keys() == service.images.keys()

    names = list(service.images)
    for start in range(0, len(names), 4):
        chunk = names[start:start + 4]
        encoded = [_b64(service.images[name].read_bytes()) for name in chunk]
        numbered = [f"image-{i}" for i in range(len(chunk))]
        for answer, sent_as in ((service.post(files=service.files(chunk)), chunk),
                                (service.post(json={"images": encoded}), numbered),
                                (service.post(json=encoded), numbered)):
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["model_name"], body["model_version"], body["data_version"]) == (
                MODEL, "1", "tiny-1")
            assert [p["name"] for p in body["predictions"]] == sent_as
            for name, prediction in zip(chunk, body["predictions"], strict=True):
                assert prediction["label"] == expected[name]["label"]
                assert abs(prediction["probability"] - expected[name]["probability"]) < TOLERANCE
                probabilities = prediction["probabilities"]
                assert sorted(probabilities) == ["0", "1", "2", "3"]
                assert probabilities[prediction["label"]] == prediction["probability"]
                assert max(probabilities.values()) == prediction["probability"]
                assert abs(sum(probabilities.values()) - 1) < 1e-4


def test_a_summary_is_logged_and_sigterm_stops_it_cleanly(service):
    summary = re.compile(r"last 1s: [1-9]\d* requests, \d+ errors, p50 [\d.]+ ms, p99 [\d.]+ "
                         rf"ms; \d+ images, classes: .*%.*; serving {MODEL} v1")
    assert service.post(files=service.files(list(service.images)[:1])).status_code == 200
    service.server.wait_for(lambda: summary.search(service.server.output()), "a summary")
    assert service.server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises it once done
    assert "Application shutdown complete" in service.server.output()
