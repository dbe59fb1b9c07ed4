"""The request lifecycle of the HTTP front end, independent of any API flavour.

`HttpServerManager` lives in the main process beside the starlette app. It tokenizes prompts,
numbers requests, sends them to the router (or, with images, to the visual server) over zmq,
and hands each request the `TextOut`s the detokenization process sends back:

    async with manager.generate(prompt_ids, sampling) as outs:
        async for out in outs:   # TextOut; the last one has finish_reason or error set
            ...

Leaving the `async with` before the last output (client gone, exception, cancellation) aborts
the request in the router, which frees its KV cache at the next step.

Requests with images (`images=`, checked by `ImageIntake.prepare`) take their image-cache
references when the context is entered and drop them when it is left, however the request
ends (finished, aborted, failed, client gone). Route handlers of every API (TGI, OpenAI) share
this class; it knows nothing about HTTP.

Threading: everything runs on the event loop of the HTTP server, except tokenization (one
worker thread, see `tokenize`) and `fail_all`, which the launcher's supervisor may call from
any thread.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar, Union

import msgspec
import zmq
import zmq.asyncio

from lightserve.cache_manager.protocol import CacheStats
from lightserve.httpserver.images import ImageIntake, PreparedImages
from lightserve.httpserver.metrics import RequestRecord, ServerMetrics
from lightserve.io_struct import (
    AbortReq, FinishReason, FlushCache, GenerateReq, ImageItem, RouterStats, SamplingParams, TextOut,
)
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths

logger = logging.getLogger(__name__)

_Outgoing = Union[GenerateReq, AbortReq, FlushCache]
T = TypeVar("T")


class ServerUnavailable(Exception):
    """Raised for new requests once the server has failed (a child process died)."""


class RequestStream:
    """The outputs of one request: an async context manager and an async iterator of `TextOut`.

    Iteration ends after the output that carries a `finish_reason` or an `error`. Entering
    submits the request; exiting before that last output aborts it.
    """

    def __init__(self, manager: "HttpServerManager", req: GenerateReq, images: Optional[PreparedImages]) -> None:
        self._manager = manager
        self.req = req
        self._images = images
        self._queue: asyncio.Queue[TextOut] = asyncio.Queue()
        self._finished = False
        self._record: Optional[RequestRecord] = None

    @property
    def req_id(self) -> int:
        return self.req.req_id

    async def __aenter__(self) -> "RequestStream":
        if self._images is not None:
            self.req.images = await self._manager._acquire_images(self._images)
        try:
            self._manager._submit(self)
        except BaseException:
            self._manager._release_images(self.req)
            raise
        self._record = self._manager.metrics.request_started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._manager._release(self, aborted=not self._finished)
        self._record.end()

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> TextOut:
        if self._finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finish_reason is not None or out.error is not None:
            self._finished = True
        self._record.on_output(out)
        return out

    def _deliver(self, out: TextOut) -> None:
        self._queue.put_nowait(out)


class HttpServerManager:
    """Request ids, the zmq links to router / visual / detokenization, and failure state.

    Lifecycle: construct anywhere, then `await start()` and `await close()` on the event loop
    that serves HTTP (the app's lifespan does both).
    """

    def __init__(self, args: ServerArgs, paths: RunPaths, tokenizer, images: Optional[ImageIntake] = None) -> None:
        self.args = args
        self.paths = paths
        self.tokenizer = tokenizer
        self.images = images  # multimodal servers: reads, checks and references request images
        self._req_ids = itertools.count()
        self._streams: dict[int, RequestStream] = {}
        self._failure: Optional[str] = None
        self._lock = threading.Lock()  # guards _failure against a supervisor thread
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._to_router: Optional[zmq.asyncio.Socket] = None
        self._to_visual: Optional[zmq.asyncio.Socket] = None
        self._from_detok: Optional[zmq.asyncio.Socket] = None
        # Outgoing messages go through one queue and one sender task: submitting and aborting
        # never wait (aborts happen in cleanup paths, even under cancellation), and an abort can
        # never overtake the request it aborts.
        self._outbox: asyncio.Queue[tuple[zmq.asyncio.Socket, _Outgoing]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        # One thread: fast tokenizers are not safe to call from several threads at once, and
        # long prompts must not block the event loop that streams everyone else's tokens.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightserve-tokenize")
        self.metrics = ServerMetrics(multimodal=images is not None)

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sockets and start the sender and receiver tasks on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._to_router = self._push(self.paths.router_in)
        if self.args.enable_multimodal:
            self._to_visual = self._push(self.paths.visual_in)
        self._from_detok = self._ctx.socket(zmq.PULL)
        self._from_detok.setsockopt(zmq.LINGER, 0)
        self._from_detok.bind(self.paths.http_in)
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="lightserve-http-send"),
            asyncio.create_task(self._recv_loop(), name="lightserve-http-recv"),
        ]

    def _push(self, address: str) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)  # never hang shutdown on a dead peer
        sock.connect(address)
        return sock

    async def close(self) -> None:
        """Refuse new requests, end the running ones, stop the tasks and close the sockets."""
        with self._lock:
            self._failure = self._failure or "server is shutting down"
        self._end_all(self._failure)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        if self.images is not None:
            self.images.close()

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: --max_body_bytes of text, plus room for the base64 images
        a request may carry on a multimodal server."""
        if self.images is None:
            return self.args.max_body_bytes
        return self.images.limits.body_limit(self.args.max_body_bytes)

    @property
    def loop(self) -> Optional[asyncio.AbstractEventLoop]:
        """The event loop the manager runs on, once started."""
        return self._loop

    # ---- health ----------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._failure is None

    @property
    def failure(self) -> Optional[str]:
        """Why the server stopped serving, or None while healthy."""
        return self._failure

    def fail_all(self, reason: str) -> None:
        """Mark the server failed: every running request ends with `reason` as its error, and
        new requests are refused. Safe to call from any thread; later calls keep the first reason.
        """
        with self._lock:
            if self._failure is not None:
                return
            self._failure = reason
        # The caller (the launcher's supervisor) logs the reason: one line per failure.
        logger.debug("httpserver: failing all requests: %s", reason)
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # not started (or already stopped): no request can be running
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._end_all(reason)
        else:
            loop.call_soon_threadsafe(self._end_all, reason)

    def _end_all(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            stream._deliver(_error_out(stream.req_id, reason))

    # ---- requests --------------------------------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Prompt token ids, by default with the special tokens the tokenizer adds (e.g. bos).

        A prompt rendered by a chat template already holds its special tokens: pass False.
        """
        return await self.with_tokenizer(lambda tok: list(tok.encode(text, add_special_tokens=add_special_tokens)))

    async def with_tokenizer(self, work: Callable[..., T]) -> T:
        """`work(tokenizer)` on the tokenizer's own thread (chat templates, decoding for logprobs)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, work, self.tokenizer)

    def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, images: Optional[PreparedImages] = None
    ) -> RequestStream:
        """A request ready to submit: use it as `async with manager.generate(...) as outs`.

        With images, `prompt_ids` are `images.prompt_ids` (image tags expanded). The request id
        is taken now; the request is sent when the context is entered, which raises
        `ServerUnavailable` if the server has failed, or the intake's `ApiError` (429, 422) if
        the image cache cannot take the images.
        """
        if images is not None and self.images is None:
            raise RuntimeError("a request with images needs --enable_multimodal")
        req = GenerateReq(req_id=next(self._req_ids), prompt_ids=list(prompt_ids), sampling=sampling)
        return RequestStream(self, req, images)

    async def _acquire_images(self, images: PreparedImages) -> list[ImageItem]:
        if self._failure is not None:  # do not wait for cache room on a failed server
            raise ServerUnavailable(self._failure)
        return await self.images.acquire(images)

    def _release_images(self, req: GenerateReq) -> None:
        # A failed server is going down with its cache manager (which may be the dead child).
        if req.images and self._failure is None:
            self.images.release(req.images)

    async def image_cache_stats(self) -> Optional[CacheStats]:
        """The cache manager's figures (multimodal servers), None otherwise."""
        if self.images is None:
            return None
        return await self.images.stats()

    def _submit(self, stream: RequestStream) -> None:
        if self._failure is not None:
            raise ServerUnavailable(self._failure)
        if self._to_router is None:
            raise RuntimeError("HttpServerManager.start() has not been called")
        target = self._target(stream.req)
        self._streams[stream.req_id] = stream
        self._outbox.put_nowait((target, stream.req))

    def _target(self, req: GenerateReq) -> zmq.asyncio.Socket:
        # Requests with images are encoded by the visual server first, which forwards them.
        if req.images:
            if self._to_visual is None:
                raise RuntimeError("a request with images needs --enable_multimodal")
            return self._to_visual
        return self._to_router

    def _release(self, stream: RequestStream, aborted: bool) -> None:
        self._streams.pop(stream.req_id, None)
        if aborted and self._failure is None:
            self._abort(stream.req)
        # After the abort is queued: should the records be evicted before the abort lands, the
        # backend zeroes the missing embeddings of a request whose output is discarded anyway.
        self._release_images(stream.req)

    def _abort(self, req: GenerateReq) -> None:
        # The visual server may still hold an image request; the router may hold any request.
        if req.images and self._to_visual is not None:
            self._outbox.put_nowait((self._to_visual, AbortReq(req.req_id)))
        self._outbox.put_nowait((self._to_router, AbortReq(req.req_id)))

    def flush_prefix_cache(self) -> None:
        """Ask the router to drop every prefix-cache entry no running request uses (before its next step)."""
        if self._to_router is None:
            raise RuntimeError("the manager is not started")
        self._outbox.put_nowait((self._to_router, FlushCache()))

    @property
    def running_requests(self) -> int:
        return len(self._streams)

    # ---- socket tasks ----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            sock, msg = await self._outbox.get()
            try:
                data = serde.dumps(msg)
            except (msgspec.EncodeError, OverflowError, TypeError) as exc:
                # A value the wire cannot carry fails its own request; the loop (every other
                # request's only way out) must go on.
                logger.error("httpserver: cannot encode %s: %s", type(msg).__name__, exc)
                if isinstance(msg, GenerateReq):
                    self._dispatch(_error_out(msg.req_id, "the request could not be sent to the router"))
                continue
            try:
                await sock.send(data)
            except zmq.ZMQError:
                logger.exception("httpserver: could not send %s", type(msg).__name__)

    async def _recv_loop(self) -> None:
        while True:
            data = await self._from_detok.recv()
            try:
                batch = serde.HTTP_IN.decode(data)
            except serde.MessageError as exc:  # one bad message must not stop the outputs of every request
                logger.error("httpserver: dropping a message: %s", exc)
                continue
            if isinstance(batch, RouterStats):
                self.metrics.update_router(batch)
                continue
            for out in batch.outs:
                self._dispatch(out)

    def _dispatch(self, out: TextOut) -> None:
        stream = self._streams.get(out.req_id)
        if stream is not None:  # else: aborted already, the output is late
            stream._deliver(out)


def failure_of(out: TextOut) -> Optional[str]:
    """The error that ended a request, or None for a normal output."""
    if out.error is not None:
        return out.error
    if out.finish_reason is FinishReason.ABORT:
        return "the request was aborted by the server"
    return None


def _error_out(req_id: int, reason: str) -> TextOut:
    return TextOut(req_id=req_id, text="", token_id=-1, logprob=0.0, finish_reason=FinishReason.ABORT, error=reason)
