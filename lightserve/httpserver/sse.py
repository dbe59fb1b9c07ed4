"""Server-sent events: the wire format and a response that stops when the client leaves."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncGenerator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from lightserve.httpserver.disconnect import cancel_and_wait, wait_for_disconnect

logger = logging.getLogger(__name__)


def sse_event(data: Any) -> bytes:
    """One `data:` event. Compact JSON never contains a newline, so one line always suffices."""
    return b"data: " + json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(Response):
    """Streams the byte chunks of `events`, and closes `events` as soon as the client leaves.

    Starlette's StreamingResponse only watches for a disconnect under some ASGI versions and
    otherwise notices it at the next write, which for a request still queued in the router may
    be minutes away. Here a disconnect cancels the stream at once, and `events` is always
    closed (`aclose`) before the response returns, so the request's cleanup (the abort) runs
    now rather than whenever the garbage collector finalizes the generator.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        # no-cache and X-Accel-Buffering: proxies must pass each event on as it comes.
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pump = asyncio.create_task(self._pump(send))
        watch = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(pump, watch)
            await self.events.aclose()
        if not pump.cancelled() and pump.exception() is not None:
            # Headers are gone already; all that is left to do is to end the response and log.
            if not isinstance(pump.exception(), OSError):  # OSError: the client went away mid-write
                logger.error("event stream failed", exc_info=pump.exception())

    async def _pump(self, send: Send) -> None:
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
