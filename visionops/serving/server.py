"""The HTTP service: /predict, /health, /ready, /version and /metrics over the version
that ChampionFollower keeps loaded, run by uvicorn in one process (`serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from visionops.core.config import Params
from visionops.serving.batching import Batcher, BatcherStopped
from visionops.serving.budget import BytesInFlight
from visionops.serving.champion import ChampionFollower, Served
from visionops.serving.inputs import BadInput, Upload, decode_all, read_images
from visionops.serving.metrics import ServingMetrics
from visionops.serving.review import ReviewCopier

LOGGER = logging.getLogger("visionops.serving")
ENDPOINTS = ("/predict", "/health", "/ready", "/version", "/metrics")


class Service:
    """The parts behind the endpoints, started and stopped with the app."""

    def __init__(self, params: Params):
        self.params = params
        self.limits = params.serving
        self.threshold = params.feedback.confidence_threshold
        self.metrics = ServingMetrics()
        self.follower = ChampionFollower(params, self.metrics.model_loaded, self.metrics.polled)
        self.batcher = Batcher(self.limits.max_batch, self.limits.batch_wait_ms / 1000,
                               self.metrics.batch_images.observe)
        self.copier = ReviewCopier(params.review_dir, self.metrics.review_copy)
        self.in_flight = BytesInFlight(self.limits.max_bytes_in_flight,
                                       self.metrics.bytes_in_flight.set)
        self.in_progress = 0  # /predict requests; read and changed on the event loop only
        # decodes at once: a large photo takes ~200 MB while decoded, whatever its bytes
        self.decoders = anyio.CapacityLimiter(os.cpu_count() or 2)
        self.retry_after = str(max(1, math.ceil(self.limits.poll_seconds)))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        self.copier.start()
        self.follower.start()  # the first load too: /health answers meanwhile
        summaries = asyncio.create_task(self._summarise())
        try:
            yield
        finally:
            summaries.cancel()
            self.follower.stop()
            self.batcher.stop()
            self.copier.stop()

    async def _summarise(self) -> None:
        every = self.limits.summary_seconds
        while True:
            await asyncio.sleep(every)
            LOGGER.info("%s", self.metrics.window.summary(every))

    # -- endpoints -------------------------------------------------------------------------
    async def predict(self, request: Request) -> JSONResponse:
        """Images in a multipart form (field `files`) or JSON base64; each one's label.
        The body is read (within its limits) before a slot of max_concurrency is taken,
        so slow clients hold bytes of the budget, never a slot."""
        served = self.follower.current  # one version answers the whole request
        if served is None:
            return self._refuse(503, "loading", "no model loaded yet",
                                retry_after=self.retry_after)
        with self.in_flight.reserve() as held:
            try:
                uploads = await read_images(request, self.limits, held)
            except BadInput as exc:
                return self._refuse(exc.status, exc.reason, exc.message, exc.retry_after)
            except Exception:
                LOGGER.exception("reading a request failed")
                return self._refuse(500, "internal_error",
                                    "the request failed; see the server log")
            if self.in_progress >= self.limits.max_concurrency:
                return self._refuse(503, "overloaded", f"{self.limits.max_concurrency} "
                                    "requests in progress already (max_concurrency)",
                                    retry_after="1")
            self.in_progress += 1
            self.metrics.in_progress.set(self.in_progress)
            try:
                pixels = await anyio.to_thread.run_sync(
                    decode_all, uploads, served.size, served.channels, self.params.validation,
                    limiter=self.decoders)
                probabilities = await self._predict(served, pixels)
            except BadInput as exc:
                return self._refuse(exc.status, exc.reason, exc.message, exc.retry_after)
            except Exception:
                LOGGER.exception("a request to %s v%s failed", served.model_name,
                                 served.version)
                return self._refuse(500, "internal_error",
                                    "the request failed; see the server log")
            finally:
                self.in_progress -= 1
                self.metrics.in_progress.set(self.in_progress)
            return JSONResponse({**self._identity(served), "predictions": self._predictions(
                served, uploads, probabilities)})

    async def _predict(self, served: Served, pixels: np.ndarray) -> np.ndarray:
        """The batcher's answer; BadInput if the model call failed (logged there)."""
        try:
            answers = self.batcher.submit(served, pixels)
            return np.concatenate([await asyncio.wrap_future(a) for a in answers])
        except BatcherStopped:
            raise BadInput(503, "broken", "the model thread has stopped; the service "
                                          "needs a restart") from None
        except Exception:
            raise BadInput(500, "prediction_failed", "the model call failed; see the "
                                                     "server log") from None

    async def health(self) -> JSONResponse:
        """Liveness: 503 once a thread the service needs has ended."""
        if broken := self._broken():
            return broken
        return JSONResponse({"status": "loading" if self.follower.current is None
                             else "ready"})

    async def ready(self) -> JSONResponse:
        if broken := self._broken():
            return broken
        if self.follower.current is None:
            return JSONResponse({"status": "loading"}, 503,
                                headers={"Retry-After": self.retry_after})
        return JSONResponse({"status": "ready"})

    async def version(self) -> JSONResponse:
        served = self.follower.current
        if served is None:
            return JSONResponse({"status": "loading"}, 503,
                                headers={"Retry-After": self.retry_after})
        return JSONResponse(served.describe())

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- helpers ---------------------------------------------------------------------------
    def _broken(self) -> JSONResponse | None:
        """503 `broken` naming a thread the service needs that has ended, else None."""
        for name, alive in (("batcher", self.batcher.alive),
                            ("champion-follower", self.follower.alive),
                            ("review-copier", self.copier.alive)):
            if not alive():
                return JSONResponse({"status": "broken",
                                     "detail": f"the {name} thread has stopped"}, 503)
        return None

    def _predictions(self, served: Served, uploads: list[Upload], probabilities: np.ndarray
                     ) -> list[dict]:
        rows = []
        for upload, row in zip(uploads, probabilities, strict=True):
            best = int(np.argmax(row))
            label, top = served.class_names[best], float(row[best])
            rows.append({"name": upload.name, "label": label, "probability": top,
                         "probabilities": dict(zip(served.class_names, map(float, row),
                                                   strict=True))})
            if top < self.threshold:
                self.copier.offer(upload.name, upload.content, label)
        self.metrics.predicted_labels([row["label"] for row in rows])
        return rows

    @staticmethod
    def _identity(served: Served) -> dict:
        return {"model_name": served.model_name, "model_version": served.version,
                "data_version": served.loaded.data_version}

    def _refuse(self, status: int, reason: str, message: str, retry_after: str | None = None
                ) -> JSONResponse:
        self.metrics.error(reason)
        return JSONResponse({"error": reason, "detail": message}, status,
                            headers={"Retry-After": retry_after} if retry_after else None)


class RequestMetrics:
    """ASGI middleware: each HTTP request counted by endpoint and status, and timed."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.request_done(endpoint, status, time.perf_counter() - started)


def create_app(params: Params) -> FastAPI:
    service = Service(params)
    app = FastAPI(title="visionops serving", lifespan=service.lifespan,
                  summary="The registered champion over HTTP, following the alias.")
    app.state.service = service
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    app.add_api_route("/predict", service.predict, methods=["POST"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/ready", service.ready, methods=["GET"])
    app.add_api_route("/version", service.version, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus, methods=["GET"])
    return app


def serve(params: Params, host: str | None = None, port: int | None = None) -> None:
    """Serve until SIGINT or SIGTERM: uvicorn, one worker, in this process."""
    import uvicorn

    _log_to_stderr()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # each load's
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, raised again by uvicorn once done
        uvicorn.run(create_app(params), host=host or params.serving.host,
                    port=params.serving.port if port is None else port, workers=1,
                    access_log=False, log_level="info")


def _log_to_stderr() -> None:
    logger = logging.getLogger("visionops.serving")
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
