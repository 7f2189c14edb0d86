"""`visionops serve-model` for real: one uvicorn server process for the module, over a
SQLite MLflow store holding two different tiny versions and one that carries a pickle,
asked over HTTP. It answers as `visionops predict` does, follows the alias through a
promotion and a rollback without failing a request, refuses bad input with the reason
and goes on, bounds the bytes it holds and the time a body may take, counts everything
in /metrics and copies unsure images for review. The faults no client can cause (a model
call that fails or hangs, a temporary file that cannot be written, a thread that ends)
are injected into the same app run in this process (`in_process`)."""

from __future__ import annotations

import base64
import io
import json
import queue
import random
import re
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from projects import write_params
from prometheus_client.parser import text_string_to_metric_families
from tiny_versions import VISIONOPS, Registration, ServingProcess, free_port

from visionops.core.config import load_params
from visionops.core.demo import write_digits
from visionops.io.feedback import review_name
from visionops.io.registry import Registry
from visionops.serving.champion import Served
from visionops.serving.server import Service as App
from visionops.serving.server import create_app

MODEL = "serving-tiny"
THRESHOLD = 0.43  # splits v1's answers on these images (checked)
LIMITS = {"poll_seconds": 0.2, "max_batch": 16, "batch_wait_ms": 5, "max_concurrency": 34,
          "max_images_per_request": 4, "max_image_bytes": 2000, "summary_seconds": 1,
          "max_request_bytes": 10_000, "max_bytes_in_flight": 40_000,
          "read_timeout_seconds": 2}
TOLERANCE = 1e-5


@dataclass
class Service:
    params_file: Path
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
        yield Service(params_file, server, registry, registered["answers"], images,
                      registered["unsafe"], marker, root / "review", before_load, cli)
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
                started = time.monotonic()
                try:
                    answer = http.post("/predict", files=service.files(chosen))
                except httpx.HTTPError as exc:
                    failed.append(repr(exc))
                    continue
                if answer.status_code != 200:
                    failed.append(f"{answer.status_code} {answer.text}")
                    continue
                answered.append((started, time.monotonic(), chosen, answer.json()))

    def switched(version: str, moved_at: float) -> float | None:
        """When the first request sent after the alias moved, answered by `version`,
        came back: every request sent later found `version` in place."""
        ends = [end for start, end, _, body in list(answered)
                if start > moved_at and body["model_version"] == version]
        return min(ends) if ends else None

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in clients:
        thread.start()
    try:
        server.wait_for(lambda: any(body["model_version"] == "1" for *_, body in answered),
                        "an answer of v1")
        promoted = time.monotonic()
        service.registry.promote("2", "a newer version", "serving-tests")
        server.wait_for(lambda: switched("2", promoted), "an answer of v2")
        rolled_back = time.monotonic()
        service.registry.rollback("back to v1", "serving-tests")
        server.wait_for(lambda: switched("1", rolled_back), "v1 again")
        seen = len(answered)
        server.wait_for(lambda: len(answered) > seen + 8, "more answers")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)

    assert failed == []
    # A request is answered by the version in place when it arrived: the ones in flight
    # at a swap may come back after it, but none sent once a swap was seen is answered
    # by the version before it.
    to_v2, to_v1 = switched("2", promoted), switched("1", rolled_back)
    by_sending = sorted(answered, key=lambda answer: answer[0])
    assert by_sending[0][3]["model_version"] == "1"
    assert {body["model_version"] for start, _, _, body in by_sending
            if to_v2 < start < rolled_back} <= {"2"}
    after = [body["model_version"] for start, _, _, body in by_sending if start > to_v1]
    assert after and set(after) == {"1"}
    for _, _, chosen, body in answered:  # each request answered whole by the version it names
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


def _encoded(image_format: str, size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, 7).save(buffer, format=image_format)
    return buffer.getvalue()


def _png_saying(width: int, height: int) -> bytes:
    """A 73-byte PNG whose header says width x height: decoded, it would take
    width * height bytes before its data ran out."""
    png = _encoded("PNG")
    header = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]


def _chunked(size: int):
    """A multipart body sent without a Content-Length: one file part, as a form parser
    reads on through it, in 1,000-byte chunks (garbage would be refused as soon as the
    parser saw it, however few bytes had come)."""
    yield (b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
           b"Content-Type: image/png\r\n\r\n")
    for _ in range(size // 1000):
        yield b"\0" * 1000


def _file(name: str, content: bytes, kind: str = "image/png") -> dict:
    return {"files": [("files", (name, content, kind))]}


# name: (the request, given a good PNG's bytes), status, error, a text the detail names
BAD_INPUTS = {
    "not an image": (lambda png: _file("notes.txt", b"just text", "text/plain"),
                     415, "unsupported_format", "notes.txt: not a PNG or JPEG image"),
    "a GIF": (lambda png: _file("a.gif", _encoded("GIF")), 415, "unsupported_format",
              "a.gif: not a PNG or JPEG image (validation.allowed_formats: PNG, JPEG)"),
    "a WebP": (lambda png: _file("a.webp", _encoded("WEBP")), 415, "unsupported_format",
               "a.webp: not a PNG or JPEG"),
    "a BMP": (lambda png: _file("a.bmp", _encoded("BMP")), 415, "unsupported_format",
              "a.bmp: not a PNG or JPEG"),
    "a TIFF in base64": (lambda png: {"json": [_b64(png), _b64(_encoded("TIFF"))]}, 415,
                         "unsupported_format", "image-1: not a PNG or JPEG"),
    "an image too large in pixels": (lambda png: _file("huge.png", _png_saying(13000, 13000)),
                                     413, "image_too_large_in_pixels",
                                     "huge.png: 13000x13000 pixels, a side over "
                                     "validation.max_side (8192)"),
    "a side too long": (lambda png: _file("long.png", _png_saying(8193, 8)), 413,
                        "image_too_large_in_pixels", "long.png: 8193x8 pixels"),
    "an image too small": (lambda png: _file("tiny.png", _encoded("PNG", (4, 4))), 422,
                           "image_too_small", "tiny.png: 4x4 pixels, a side under "
                                              "validation.min_side (8)"),
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
    "a too large body": (lambda png: {"content": b"-" * 15_000, "headers": {
        "Content-Type": "multipart/form-data; boundary=x"}}, 413, "body_too_large",
                         "larger than 10000 bytes (serving.max_request_bytes)"),
    "a too large body without a length": (lambda png: {"content": _chunked(15_000), "headers": {
        "Content-Type": "multipart/form-data; boundary=x"}}, 413, "body_too_large",
                                          "larger than 10000 bytes (serving.max_request_bytes)"),
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
    assert service.post(files=[("files", ("x.txt", b"x", "text/plain"))]).status_code == 415
    service.server.wait_for(lambda: value(
        service.metrics(), "visionops_serving_requests_total", endpoint="/predict",
        status="415") > value(before, "visionops_serving_requests_total",
                              endpoint="/predict", status="415"), "the requests counted")
    after = service.metrics()

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("visionops_serving_requests_total", endpoint="/predict", status="200") == 1
    assert grew("visionops_serving_requests_total", endpoint="/predict", status="415") == 1
    assert grew("visionops_serving_request_seconds_count", endpoint="/predict") == 2
    assert grew("visionops_serving_errors_total", reason="unsupported_format") == 1
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
    polled = value(after, "visionops_serving_last_poll_timestamp_seconds")
    assert time.time() - 10 < polled <= time.time()  # polls every 0.2 s
    service.server.wait_for(lambda: value(service.metrics(), "visionops_serving_last_poll_"
                                          "timestamp_seconds") > polled, "the next poll")


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

    def copies() -> set[tuple[str, str]]:  # (label, file): the area's own folder left out
        return {(path.parent.name, path.name) for path in service.review.glob("*/*")
                if path.is_file() and not path.parent.name.startswith(".")}

    def content_of(copies: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(label, name.rsplit("-", 1)[1]) for label, name in copies}

    def hashes(copies: set[tuple[str, str]]) -> set[str]:
        return {content for _, content in content_of(copies)}

    # Each unsure image is sent once: under v1's label, or under v2's if v2 was unsure of
    # it too while it served. Nothing else: only unsure answers, also of images sent as
    # base64 (named image-<i>), compared on label and content hash.
    service.server.wait_for(lambda: hashes(expected) <= hashes(copies()), "the review copies")
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


def test_a_jpeg_is_taken_as_a_png_is(service):  # after the review test: its copy is .jpg
    name = list(service.images)[0]
    buffer = io.BytesIO()
    Image.open(service.images[name]).save(buffer, format="JPEG", quality=100)
    answer = service.post(files=[("files", ("digit.jpg", buffer.getvalue(), "image/jpeg"))])
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["name"] == "digit.jpg"


def _stalled(port: int, length: int) -> socket.socket:
    """A client that sends its headers and the first bytes of a body of `length`, then
    nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
                 "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n".encode())
    return sock


def _answer(sock: socket.socket) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of the answer on a raw socket."""
    with sock, sock.makefile("rb") as reader:
        status = int(reader.readline().split()[1])
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, text = line.decode().partition(":")
            headers[name.strip().lower()] = text.strip()
        return status, headers, json.loads(reader.read(int(headers["content-length"])))


def test_slow_clients_time_out_holding_bytes_of_the_budget_never_a_slot(service):
    port, good = service.server.port, list(service.images)[0]
    small, large = 500, 9_000  # 35 x 500 + 2 x 9000 of the 40 000 in flight
    stalled = [_stalled(port, small) for _ in range(LIMITS["max_concurrency"] + 1)]
    stalled += [_stalled(port, large) for _ in range(2)]
    started = time.monotonic()
    held = 35 * small + 2 * large
    try:
        service.server.wait_for(lambda: value(service.metrics(),
                                              "visionops_serving_bytes_in_flight") == held,
                                "the bodies held")
        answered = service.post(files=service.files([good]))  # every slot still free
        over = service.post(content=b"-" * large, headers={
            "Content-Type": "multipart/form-data; boundary=x"})
        answers = [_answer(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    waited = time.monotonic() - started
    assert answered.status_code == 200, answered.text
    assert over.status_code == 503 and over.json()["error"] == "overloaded"
    assert over.headers["Retry-After"] == "1"
    assert "max_bytes_in_flight (40000)" in over.json()["detail"]
    assert [(status, body["error"]) for status, _, body in answers] == [
        (408, "read_timeout")] * len(stalled)
    assert "serving.read_timeout_seconds" in answers[0][2]["detail"]
    assert LIMITS["read_timeout_seconds"] <= waited < LIMITS["read_timeout_seconds"] + 20
    after = service.metrics()
    assert value(after, "visionops_serving_bytes_in_flight") == 0
    assert value(after, "visionops_serving_predict_in_progress") == 0
    assert service.post(files=service.files([good])).status_code == 200


def test_the_alias_deleted_leaves_its_version_serving_and_says_so(service):
    server, client = service.server, service.registry.client
    gone = value(service.metrics(), "visionops_serving_model_loads_total", outcome="alias_gone")
    mark = len(server.output())
    client.delete_registered_model_alias(MODEL, "champion")
    try:
        server.wait_for(lambda: value(service.metrics(), "visionops_serving_model_loads_total",
                                      outcome="alias_gone") > gone, "the alias gone counted")
        answer = service.post(files=service.files(list(service.images)[:1]))
    finally:
        client.set_registered_model_alias(MODEL, "champion", "1")
    assert answer.status_code == 200 and answer.json()["model_version"] == "1"
    log = server.output()[mark:]
    assert "the champion alias is gone; still serving v1" in log
    assert "no champion yet" not in log


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


# -- faults injected into the same app, run in this process -----------------------------------
FAULTS: queue.SimpleQueue = queue.SimpleQueue()  # for the next model calls, in order


class WithFaults(Served):
    """The loaded version; a model call first takes the next fault queued, if any: an
    exception it raises, an Event it waits for, or anything else it answers instead."""

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        try:
            fault = FAULTS.get_nowait()
        except queue.Empty:
            return super().predict(pixels)
        if isinstance(fault, Exception):
            raise fault
        if isinstance(fault, threading.Event):
            fault.wait(30)
            return super().predict(pixels)
        return fault


@dataclass
class InProcess:
    app: App
    url: str

    def post(self, timeout: float = 20, **request) -> httpx.Response:
        return httpx.post(self.url + "/predict", timeout=timeout, **request)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=20)


def _wait(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def in_process(service, tmp_path_factory):
    """create_app on the module's store under a uvicorn thread: max_concurrency 3, parts
    over 1 MB (spooled to temporary files) taken; v1 served WithFaults."""
    params = load_params(service.params_file, serving__max_concurrency=3,
                         serving__max_image_bytes=2_000_000,
                         serving__max_request_bytes=3_000_000,
                         serving__max_bytes_in_flight=10_000_000,
                         feedback__review_dir=str(tmp_path_factory.mktemp("review")))
    app = create_app(params)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="in-process-uvicorn")
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        served = app.state.service.follower
        _wait(lambda: served.current is not None and served.current.version == "1", "v1")
        loaded = served.current
        served.current = WithFaults(loaded.loaded, loaded.model_name, loaded.loaded_at)
        yield InProcess(app.state.service, url)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def test_a_failing_model_call_answers_500_and_the_next_request_is_answered(service,
                                                                          in_process):
    name = list(service.images)[0]
    for fault in (RuntimeError("secret-in-the-exception"), None):  # raises; answers None
        FAULTS.put(fault)
        failed = in_process.post(files=service.files([name]))
        assert failed.status_code == 500, failed.text
        assert failed.json() == {"error": "prediction_failed",
                                 "detail": "the model call failed; see the server log"}
        answer = in_process.post(files=service.files([name]))
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] == service.answers["1"][name]["label"]
    assert in_process.get("/health").json() == {"status": "ready"}


def test_requests_past_max_concurrency_get_503_with_retry_after(service, in_process):
    release, good, answers = threading.Event(), list(service.images)[0], []
    FAULTS.put(release)  # the first model call waits: the requests stay in progress
    blocked = [threading.Thread(target=lambda: answers.append(
        in_process.post(files=service.files([good])))) for _ in range(3)]
    for thread in blocked:
        thread.start()
    try:
        _wait(lambda: in_process.app.in_progress == 3, "3 requests in progress", 30)
        refused = in_process.post(files=service.files([good]))
    finally:
        release.set()
        for thread in blocked:
            thread.join(timeout=60)
    assert refused.status_code == 503
    assert refused.json()["error"] == "overloaded" and refused.headers["Retry-After"] == "1"
    assert [answer.status_code for answer in answers] == [200] * 3
    assert in_process.app.in_progress == 0


def test_a_part_that_cannot_be_spooled_gets_507(service, in_process, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # parts over 1 MB
    refused = in_process.post(files=[("files", ("large.png", b"\x89PNG" * 400_000,
                                                "image/png"))])
    monkeypatch.undo()
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"] == "insufficient_storage"
    assert "No such file or directory" in refused.json()["detail"]
    assert in_process.app.in_flight.held == 0
    assert in_process.post(files=service.files(list(service.images)[:1])).status_code == 200


def test_health_says_broken_once_the_model_thread_has_stopped(service, in_process):
    in_process.app.batcher.stop()  # as if it had died
    broken = {"status": "broken", "detail": "the batcher thread has stopped"}
    for path in ("/health", "/ready"):
        answer = in_process.get(path)
        assert (answer.status_code, answer.json()) == (503, broken)
    answer = in_process.post(files=service.files(list(service.images)[:1]))
    assert answer.status_code == 503 and answer.json()["error"] == "broken"


def test_a_summary_is_logged_and_sigterm_stops_it_cleanly(service):
    summary = re.compile(r"last 1s: [1-9]\d* requests, \d+ errors, p50 [\d.]+ ms, p99 [\d.]+ "
                         rf"ms; \d+ images, classes: .*%.*; serving {MODEL} v1")
    assert service.post(files=service.files(list(service.images)[:1])).status_code == 200
    service.server.wait_for(lambda: summary.search(service.server.output()), "a summary")
    assert service.server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises it once done
    assert "Application shutdown complete" in service.server.output()
