"""What the service counts: Prometheus metrics in a registry of its own (`/metrics`), and
a window of recent traffic summarised in a log line every `summary_seconds`."""

from __future__ import annotations

import logging
from collections import Counter as Tally

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from visionops.serving.champion import Served

LOGGER = logging.getLogger("visionops.serving")
PREFIX = "visionops_serving"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
WINDOW_LATENCIES = 100_000  # latencies kept between two summaries


class ServingMetrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered",
                                ["endpoint", "status"], registry=r)
        self.in_progress = Gauge(f"{PREFIX}_predict_in_progress",
                                 "/predict requests in progress (max_concurrency)", registry=r)
        self.latency = Histogram(f"{PREFIX}_request_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter(f"{PREFIX}_images_predicted", "Images predicted", registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Requests refused or failed, by reason",
                              ["reason"], registry=r)
        self.predicted = Counter(f"{PREFIX}_predictions", "Images by predicted label",
                                 ["label"], registry=r)
        self.batch_images = Histogram(f"{PREFIX}_batch_images", "Images in one model call",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.model_version = Gauge(f"{PREFIX}_model_version",
                                   "Registered version being served (0: none yet)", registry=r)
        self.model = Info(f"{PREFIX}_model", "The version being served", registry=r)
        self.loads = Counter(f"{PREFIX}_model_loads",
                             "Champion polls by outcome: loaded, failed (the old version "
                             "kept serving), alias_unreadable, alias_gone (the version "
                             "served goes on)", ["outcome"], registry=r)
        self.last_poll = Gauge(f"{PREFIX}_last_poll_timestamp_seconds",
                               "When a poll of the champion alias (and the load it asked "
                               "for) last ended; a stale one: the follower hangs", registry=r)
        self.bytes_in_flight = Gauge(f"{PREFIX}_bytes_in_flight",
                                     "Request body bytes held (max_bytes_in_flight)",
                                     registry=r)
        self.review_copies = Counter(f"{PREFIX}_review_copies",
                                     "Low-confidence images for review: copied, dropped "
                                     "(queue full), failed", ["outcome"], registry=r)
        self.window = TrafficWindow()

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        self.window.request_done(status, seconds)

    def error(self, reason: str) -> None:
        self.errors.labels(reason).inc()

    def review_copy(self, outcome: str) -> None:
        self.review_copies.labels(outcome).inc()

    def predicted_labels(self, labels: list[str]) -> None:
        self.images.inc(len(labels))
        for label, count in Tally(labels).items():
            self.predicted.labels(label).inc(count)
        self.window.labels.update(labels)

    def polled(self) -> None:
        self.last_poll.set_to_current_time()

    def model_loaded(self, outcome: str, served: Served | None) -> None:
        self.loads.labels(outcome).inc()
        if served is not None:
            self.model_version.set(float(served.version))
            self.model.info({"model_name": served.model_name, "version": served.version,
                             "data_version": served.loaded.data_version,
                             "run_id": served.loaded.run_id})
            self.window.version = f"{served.model_name} v{served.version}"


class TrafficWindow:
    """Traffic since the last summary. Touched from the event loop only."""

    def __init__(self):
        self.version = "no model yet"
        self._reset()

    def _reset(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.labels: Tally[str] = Tally()

    def request_done(self, status: int, seconds: float) -> None:
        self.requests += 1
        self.errors += status >= 400
        if len(self.latencies) < WINDOW_LATENCIES:
            self.latencies.append(seconds)

    def summary(self, seconds: float) -> str:
        """One line about the window, which then starts again."""
        if self.latencies:
            p50, p99 = np.percentile(self.latencies, [50, 99]) * 1000
            latency = f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        else:
            latency = "no latency"
        total = sum(self.labels.values())
        shares = ", ".join(f"{label} {count / total:.0%}"
                           for label, count in sorted(self.labels.items())) or "none"
        line = (f"last {seconds:.0f}s: {self.requests} requests, {self.errors} errors, "
                f"{latency}; {total} images, classes: {shares}; serving {self.version}")
        self._reset()
        return line
