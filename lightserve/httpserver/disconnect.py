"""Noticing that an HTTP client went away, so its request can be aborted at once.

After the body is read, the ASGI `receive` channel has only one thing left to say:
`http.disconnect`. Waiting on it (instead of polling) costs nothing and wakes immediately.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its answer was ready."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected. Call only after the request body was read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it and raise `ClientDisconnected` if the client leaves first.

    Cancelling `work` is what aborts the request: its `async with manager.generate(...)` exits
    before the last output.
    """
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.create_task(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(work_task, watch_task)
    if work_task.done() and not work_task.cancelled():
        return work_task.result()
    raise ClientDisconnected()


async def cancel_and_wait(*tasks: asyncio.Future) -> None:
    """Cancel the tasks not yet done and wait until they have finished unwinding."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
