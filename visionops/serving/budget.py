"""Request body bytes held at once, all requests together (`serving.max_bytes_in_flight`).

A request holds a `Reservation`: its declared Content-Length before a byte is read, more
as a body without one arrives, all of it given back when the request ends. A request
that would pass the budget is refused with 503 and Retry-After, so memory (and the
temporary files of large multipart parts) stay bounded whatever `max_concurrency` and
`max_request_bytes` are. Used on the event loop only, so it needs no lock."""

from __future__ import annotations

from collections.abc import Callable


class OverBudget(Exception):
    """More bytes than the budget has left; the message says how many."""


class BytesInFlight:
    def __init__(self, most: int, on_change: Callable[[int], None] = lambda held: None):
        self.most = most
        self.held = 0
        self.on_change = on_change  # told the bytes held after each change

    def reserve(self) -> Reservation:
        return Reservation(self)

    def take(self, count: int) -> None:
        if self.held + count > self.most:
            raise OverBudget(f"{self.held} bytes of request bodies are held already; "
                             f"{count} more would pass serving.max_bytes_in_flight "
                             f"({self.most})")
        self.held += count
        self.on_change(self.held)

    def give_back(self, count: int) -> None:
        self.held -= count
        self.on_change(self.held)


class Reservation:
    """One request's bytes; a context manager that gives them all back on exit."""

    def __init__(self, budget: BytesInFlight):
        self.budget = budget
        self.taken = 0

    def cover(self, total: int) -> None:
        """Hold at least `total` bytes for this request, or raise OverBudget."""
        if total > self.taken:
            self.budget.take(total - self.taken)
            self.taken = total

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.budget.give_back(self.taken)
        self.taken = 0
