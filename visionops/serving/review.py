"""Low-confidence images copied to the review area (visionops.io.feedback) off the request
path: a bounded queue and one thread; when the queue is full, the copy is dropped and
counted, never waited for. The queue holds at most QUEUED_COPIES images and
QUEUED_BYTES bytes."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from visionops.io.feedback import ReviewArea
from visionops.serving.inputs import image_format  # its signature names the copy's suffix

LOGGER = logging.getLogger("visionops.serving")
QUEUED_COPIES = 256
QUEUED_BYTES = 64 * 2**20


class ReviewCopier:
    def __init__(self, location: str, on_outcome: Callable[[str], None]):
        self.location = location
        self.on_outcome = on_outcome  # told copied, dropped or failed
        self._copies: queue.Queue[tuple[str, bytes, str] | None] = queue.Queue(QUEUED_COPIES)
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="review-copier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            self._copies.put(None, timeout=10)  # after the copies queued before it
        except queue.Full:
            return  # a copy that hangs: the daemon thread ends with the process
        self._thread.join(timeout=30)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def offer(self, name: str, content: bytes, label: str) -> None:
        with self._lock:
            if self._queued_bytes + len(content) > QUEUED_BYTES:
                self.on_outcome("dropped")
                return
            try:
                self._copies.put_nowait((name, content, label))
            except queue.Full:
                self.on_outcome("dropped")
                return
            self._queued_bytes += len(content)

    def _run(self) -> None:
        area = None
        while (copy := self._copies.get()) is not None:
            name, content, label = copy
            with self._lock:
                self._queued_bytes -= len(content)
            try:
                area = area or ReviewArea(self.location)
                area.add(name, content, label, image_format(content))
            except Exception as exc:  # the area unreachable or refusing: serving goes on
                LOGGER.warning("could not copy %s for review under %s: %s", name, label, exc)
                self.on_outcome("failed")
            else:
                self.on_outcome("copied")
