"""The in-flight bound: at most `running_max_req_size + max_waiting_reqs` generations at once.

Every generation the HTTP server has accepted is running in the router's batch or waiting for
it. Bounding their number here bounds the router's waiting queue, the tokenizer's backlog and
the memory of queued prompts: an overload is answered at once with 429 instead of growing a
backlog no client will wait for. (The KV pool needs no bound here: the router never admits more
than it holds.)

A handler takes room with `admission_of(request).grow_to(count)` as soon as it knows how many
generations its request makes (after the body is parsed, so a malformed body is still a 422
under load). `AdmissionMiddleware` gives the room back when the HTTP exchange ends, after the
last byte of a stream, a disconnect or an error, so no path through a handler can leak it.

Everything runs on the server's event loop, so the counts need no lock.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from lightserve.httpserver.errors import overloaded, validation_error

_SCOPE_KEY = "lightserve.admission"


class InFlightLimit:
    """The number of generations admitted now, and the most there may be."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the in-flight limit must be positive, got {capacity}")
        self.capacity = capacity
        self.in_flight = 0

    def take(self, count: int) -> bool:
        if self.in_flight + count > self.capacity:
            return False
        self.in_flight += count
        return True

    def give_back(self, count: int) -> None:
        self.in_flight -= count


class Admission:
    """The room one HTTP request holds in an `InFlightLimit` (none until `grow_to`)."""

    def __init__(self, limit: InFlightLimit) -> None:
        self._limit = limit
        self.count = 0

    def grow_to(self, count: int, param: str = "n") -> None:
        """Hold room for `count` generations in all, or raise 429 (422 if it can never fit)."""
        if count <= self.count:
            return
        if count > self._limit.capacity:
            # Waiting would not help: refuse as invalid rather than invite retries.
            raise validation_error(
                f"this request makes {count} generations; the server admits at most {self._limit.capacity} at once",
                param)
        if not self._limit.take(count - self.count):
            raise overloaded(
                f"server overloaded: {self._limit.in_flight} generations in flight, at most {self._limit.capacity} "
                "(running batch + waiting queue); retry later")
        self.count = count

    def release(self) -> None:
        self._limit.give_back(self.count)
        self.count = 0


def admission_of(request: Request) -> Admission:
    """The admission of the HTTP request being handled (set up by `AdmissionMiddleware`)."""
    return request.scope[_SCOPE_KEY]


class AdmissionMiddleware:
    """Gives every HTTP request an empty `Admission` and releases it when the exchange ends.

    Pure ASGI middleware: it must see the end of a streamed response, which only the ASGI call
    returning marks.
    """

    def __init__(self, app: ASGIApp, limit: InFlightLimit) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = Admission(self.limit)
        scope[_SCOPE_KEY] = admission
        try:
            await self.app(scope, receive, send)
        finally:
            admission.release()
