"""The router process: receives requests, runs the scheduling loop, streams tokens out."""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection

import zmq

from lightserve.io_struct import AbortReq, BatchTokenOut, FinishReason, FlushCache, GenerateReq, RouterStats, TokenOut
from lightserve.router.scheduler import Scheduler
from lightserve.router.stats_log import StatsLog
from lightserve.router.worker_client import WorkerGroup
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.inbox import drain
from lightserve.utils.process import run_child
from lightserve.utils.run_paths import RunPaths

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.05

# What a client is told when its batch failed in the backend: the cause is in the server log,
# never in the answer.
BATCH_FAILED = "the backend failed while running this request's batch"


def raised_by_backend(exc: BaseException) -> bool:
    """Whether `exc` is an error a live rank raised and sent back, rather than a dead link.

    rpyc re-raises a remote exception locally with the remote traceback attached as
    `_remote_tb`; a worker that died shows up as a local EOFError or OSError on the connection,
    which must still take the server down.
    """
    return hasattr(exc, "_remote_tb")


class RouterManager:
    def __init__(self, args: ServerArgs, paths: RunPaths, max_total_token_num: int):
        self.args = args
        self.ctx = ctx = zmq.Context()
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.bind(paths.router_in)
        self.to_detok = ctx.socket(zmq.PUSH)
        self.to_detok.connect(paths.detok_in)
        self.to_http = ctx.socket(zmq.PUSH)  # load figures for /metrics
        self.to_http.connect(paths.http_in)
        self._last_stats_time = 0.0
        self._unpublished = True  # something changed since the last RouterStats
        self.workers = WorkerGroup(paths, args.ranks_of_node())
        self.scheduler = Scheduler.for_server(args, self.workers, max_total_token_num)
        self.queue = self.scheduler.queue
        self.stats_log = StatsLog(args.log_stats_interval)

    def close(self) -> None:
        """Drop the links (messages not yet delivered are discarded: nobody is left to read them)."""
        self.workers.close()
        self.ctx.destroy(linger=0)

    def loop(self) -> None:
        while True:
            self.receive(block=not self.scheduler.has_work)
            self.step()
            self.publish_stats()
            self.log_stats()

    def step(self) -> None:
        """One scheduler step; its tokens (or the errors of a batch that failed) go out."""
        try:
            outs = self.scheduler.step()
        except Exception as exc:
            if not raised_by_backend(exc):
                raise
            outs = self.fail_batch(exc)
        if outs:
            self.to_detok.send(serde.dumps(BatchTokenOut(outs)))
            self._unpublished = True

    def fail_batch(self, exc: Exception) -> list[TokenOut]:
        """The requests of the step that raised end with an error; the router serves on."""
        failed = self.scheduler.fail_step()
        # rpyc appends the remote traceback to the message: its first line is the error itself.
        logger.error("router: backend call failed (%s: %s); failed %d request(s): %s", type(exc).__name__,
                     str(exc).partition("\n")[0], len(failed), failed)
        return [TokenOut(req_id, -1, 0.0, FinishReason.ABORT, error=BATCH_FAILED) for req_id in failed]

    def publish_stats(self) -> None:
        """Send RouterStats at most every STATS_INTERVAL_S while busy, and once on going idle
        (so an idle pool reads as free). KV figures come from rank 0's pool itself, as its last
        step reported them."""
        now = time.monotonic()
        if not self._unpublished:
            return
        if self.scheduler.has_work and now - self._last_stats_time < STATS_INTERVAL_S:
            return
        s = self.scheduler
        # Unused prefix-cache entries are free for any request: they do not count as used.
        stats = RouterStats(
            kv_total=s.kv_total, kv_used=s.kv_total - s.kv_free - s.kv_evictable, running_reqs=len(s.running),
            waiting_reqs=len(self.queue), kv_cached=s.kv_cached, queue_times=s.take_queue_times(),
        )
        self.to_http.send(serde.dumps(stats))
        self._last_stats_time = now
        self._unpublished = self.scheduler.has_work  # keep reporting while busy

    def log_stats(self) -> None:
        s = self.scheduler
        self.stats_log.maybe_log(s.prompt_tokens, s.generated_tokens, len(s.running), len(self.queue),
                                 s.kv_total - s.kv_free - s.kv_evictable, s.kv_total,
                                 s.cache_queried_tokens, s.cache_hit_tokens)

    def receive(self, block: bool) -> None:
        """Take every message waiting (and wait for one if there is nothing to do)."""
        for msg in drain(self.inbox, serde.ROUTER_IN, block):
            self._unpublished = True
            if isinstance(msg, GenerateReq):
                self.add_request(msg)
            elif isinstance(msg, AbortReq):  # the client left, or the detokenizer found a stop string
                self.scheduler.abort(msg.req_id)
                self.to_detok.send(serde.dumps(msg))
            elif isinstance(msg, FlushCache):
                self.scheduler.flush_cache()

    def add_request(self, req: GenerateReq) -> None:
        # The detokenizer learns the request (stop strings, prompt) before any of its tokens.
        self.to_detok.send(serde.dumps(req))
        why = self.queue.check_request_fits(len(req.prompt_ids), req.sampling.max_new_tokens)
        if why is not None:
            refusal = TokenOut(req.req_id, -1, 0.0, FinishReason.ABORT, error=why)
            self.to_detok.send(serde.dumps(BatchTokenOut([refusal])))
            return
        self.scheduler.add(req)


def start_router_process(args: ServerArgs, paths: RunPaths, max_total_token_num: int, pipe: Connection) -> None:
    def setup():
        router = RouterManager(args, paths, max_total_token_num)
        return router.loop, {}

    run_child("router", pipe, args.log_level, setup)
