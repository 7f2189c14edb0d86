"""Images of requests that arrive together, predicted in one model call.

One thread takes jobs (a request's decoded images and the version that answers them) from
a queue: after the first, it waits at most `wait_seconds` for more, up to `max_batch`
images, then makes one model call per version among them. Every job taken is answered,
with its probabilities or with the exception its call raised; should the thread end
anyway, every job it held or that waits in the queue gets BatcherStopped, and so does
every later `submit`: no request waits for ever."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

from visionops.serving.champion import Served

LOGGER = logging.getLogger("visionops.serving")


class BatcherStopped(RuntimeError):
    """The model thread is gone: nothing more will be predicted."""


@dataclass
class Job:
    served: Served
    pixels: np.ndarray  # uint8 (N, size, size, channels), N <= max_batch
    answer: Future      # set to the probabilities (N, classes)


class Batcher:
    def __init__(self, max_batch: int, wait_seconds: float,
                 on_batch: Callable[[int], None] = lambda images: None):
        self.max_batch = max_batch
        self.wait_seconds = wait_seconds
        self.on_batch = on_batch  # told each model call's number of images
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._held: Job | None = None  # took it, but it did not fit the batch being built
        self._stopped = False  # set, under the lock, once the thread will take no more
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, served: Served, pixels: np.ndarray) -> list[Future]:
        """Futures of the probabilities, one per `max_batch` images, in order."""
        jobs = [Job(served, pixels[start:start + self.max_batch], Future())
                for start in range(0, len(pixels), self.max_batch)]
        with self._lock:
            if self._stopped:
                raise BatcherStopped("the batcher thread has stopped")
            for job in jobs:
                self._jobs.put(job)
        return [job.answer for job in jobs]

    def _run(self) -> None:
        batch: list[Job] = []
        try:
            while True:
                first = self._held or self._jobs.get()
                self._held = None
                if first is None:
                    return
                batch, stopping = self._fill([first])
                try:
                    self._predict(batch)
                except Exception as exc:  # a fault outside a model call: the thread goes on
                    LOGGER.exception("a batch of %d jobs failed", len(batch))
                    _fail(batch, exc)
                if stopping:
                    return
        finally:  # normally at stop(); if by an error, the requests still get an answer
            with self._lock:
                self._stopped = True
            left = [*batch, self._held]
            while not self._jobs.empty():
                left.append(self._jobs.get_nowait())
            _fail([job for job in left if job is not None],
                  BatcherStopped("the batcher thread has stopped"))

    def _fill(self, batch: list[Job]) -> tuple[list[Job], bool]:
        images = len(batch[0].pixels)
        deadline = time.monotonic() + self.wait_seconds
        while images < self.max_batch:
            try:
                job = self._jobs.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is None:
                return batch, True
            if images + len(job.pixels) > self.max_batch:
                self._held = job
                break
            batch.append(job)
            images += len(job.pixels)
        return batch, False

    def _predict(self, batch: list[Job]) -> None:
        by_version: dict[int, list[Job]] = {}
        for job in batch:
            if job.answer.set_running_or_notify_cancel():  # else its request is gone
                by_version.setdefault(id(job.served), []).append(job)
        for jobs in by_version.values():
            try:
                self._call(jobs)
            except Exception as exc:  # answered to each request of the call
                LOGGER.exception("a model call of v%s failed", jobs[0].served.version)
                _fail(jobs, exc)

    def _call(self, jobs: list[Job]) -> None:
        """One model call for jobs of one version, each answered its rows."""
        pixels = np.concatenate([job.pixels for job in jobs])
        probabilities = np.asarray(jobs[0].served.predict(pixels))
        if probabilities.ndim != 2 or len(probabilities) != len(pixels):
            raise ValueError(f"the model answered shape {probabilities.shape} for "
                             f"{len(pixels)} images")
        self.on_batch(len(pixels))
        start = 0
        for job in jobs:
            job.answer.set_result(probabilities[start:start + len(job.pixels)])
            start += len(job.pixels)


def _fail(jobs: list[Job], exc: BaseException) -> None:
    """Each job not answered yet gets `exc`."""
    for job in jobs:
        with contextlib.suppress(InvalidStateError):  # answered already, or its request gone
            job.answer.set_exception(exc)
