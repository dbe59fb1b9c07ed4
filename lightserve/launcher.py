"""Starts and supervises the processes of one server instance.

Order: with --enable_multimodal the cache manager first (the visual server and the httpserver
connect to it); then backend ranks, the detokenizer and the visual server together (the ranks
report the KV pool size), then the router, then the HTTP server runs in this process. Any
child that fails to start stops everything with that child's error; any child that dies later
turns /health to 503, fails the requests in flight and shuts the server down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing as mp
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Optional

from typing import TYPE_CHECKING

import uvicorn

from lightserve.cache_manager import shm
from lightserve.server_args import ServerArgs
from lightserve.utils.process import ChildStatus, EntryPoint
from lightserve.utils.run_paths import RunPaths

if TYPE_CHECKING:
    from lightserve.httpserver.manager import HttpServerManager

# The children's entries, imported only by the children: the launcher starts them first and loads
# the HTTP side (transformers, the tokenizer) while they start.
start_backend_process = EntryPoint("lightserve.backend.worker", "start_backend_process")
start_cache_manager_process = EntryPoint("lightserve.cache_manager.manager", "start_cache_manager_process")
start_detokenization_process = EntryPoint("lightserve.detokenization.manager", "start_detokenization_process")
start_router_process = EntryPoint("lightserve.router.manager", "start_router_process")
start_visual_process = EntryPoint("lightserve.visual.manager", "start_visual_process")

logger = logging.getLogger("lightserve")

START_TIMEOUT_S = 600.0


class ChildStartError(RuntimeError):
    pass


class StopRequested(Exception):
    """SIGTERM or SIGINT: stop the server and clean up."""


def _raise_stop(signum, frame) -> None:
    raise StopRequested()


@dataclass
class Child:
    name: str
    process: mp.Process


@dataclass
class Starting:
    """Children spawned together, not yet known to be ready."""

    waiting: list[tuple[str, mp.Process, Any]]

    def wait(self) -> list[ChildStatus]:
        """Each child's report, in spawn order; the first failure raises `ChildStartError`."""
        return [self._await_ready(name, proc, pipe) for name, proc, pipe in self.waiting]

    @staticmethod
    def _await_ready(name: str, proc: mp.Process, pipe) -> ChildStatus:
        ready = wait([pipe, proc.sentinel], timeout=START_TIMEOUT_S)
        if pipe in ready:
            try:
                status: ChildStatus = pipe.recv()
            except EOFError:
                status = ChildStatus(name, ok=False, error=f"{name} exited during start-up (exit code {proc.exitcode})")
        elif proc.sentinel in ready:
            proc.join()
            status = ChildStatus(name, ok=False, error=f"{name} exited during start-up (exit code {proc.exitcode})")
        else:
            status = ChildStatus(name, ok=False, error=f"{name} did not start within {START_TIMEOUT_S:.0f} s")
        if not status.ok:
            raise ChildStartError(status.error)
        return status


class ChildGroup:
    """The child processes of this instance, started with the spawn context."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.children: list[Child] = []

    def start(self, specs: list[tuple[str, Callable, tuple]]) -> list[ChildStatus]:
        """Start every (name, entry, args) at once; wait until all report ready."""
        return self.spawn(specs).wait()

    def spawn(self, specs: list[tuple[str, Callable, tuple]]) -> Starting:
        """Start every (name, entry, args) at once; `.wait()` on the result for their reports."""
        waiting = []
        for name, entry, args in specs:
            parent_end, child_end = self.ctx.Pipe(duplex=False)
            proc = self.ctx.Process(target=entry, args=(*args, child_end), name=name, daemon=True)
            proc.start()
            child_end.close()
            self.children.append(Child(name, proc))
            waiting.append((name, proc, parent_end))
        return Starting(waiting)

    def wait_for_death(self, stop: threading.Event) -> Optional[Child]:
        """Block until a child exits (returns it) or `stop` is set (returns None)."""
        sentinels = {c.process.sentinel: c for c in self.children}
        while not stop.is_set():
            ready = wait(list(sentinels), timeout=0.2)
            if ready:
                return sentinels[ready[0]]
        return None

    def stop_all(self, grace_s: float = 5.0) -> None:
        for c in self.children:
            if c.process.is_alive():
                c.process.terminate()
        for c in self.children:
            c.process.join(grace_s)
            if c.process.is_alive():
                c.process.kill()
                c.process.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch_children(children: ChildGroup, stop: threading.Event, on_death: Callable[[str], None]) -> None:
    dead = children.wait_for_death(stop)
    if dead is None or stop.is_set():  # children stopped by our own shutdown are no crash
        return
    # A sentinel fires before the process is reaped: join to read the real exit code. Peers of
    # the dead child may follow it within moments (a rank losing its collective partner);
    # the report names the one that failed with a non-zero code first, not a bystander.
    dead.process.join(1.0)
    if not dead.process.exitcode:
        crashed = [c for c in children.children if c.process.exitcode]
        dead = crashed[0] if crashed else dead
    on_death(f"child process {dead.name} died (exit code {dead.process.exitcode})")


class _Server(uvicorn.Server):
    """uvicorn cancels handlers still running when its graceful-shutdown timeout ends, cutting
    streams without a final event. Shortly before that, end every request in flight with an
    error event (or error body) of our own, so that each client learns why it stopped."""

    def __init__(self, config: uvicorn.Config, manager: HttpServerManager, fail_after_s: float):
        super().__init__(config)
        self.manager = manager
        self.fail_after_s = fail_after_s

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.fail_after_s, self.manager.fail_all, "server is shutting down")
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def _serve_ranks_only(args: ServerArgs, children: ChildGroup, ranks: list) -> int:
    """A node other than 0 runs only its backend ranks; node 0's rank 0 drives them."""
    if not args.dist_init_addr:
        raise ChildStartError("--node_rank > 0 needs --dist_init_addr (node 0's torch.distributed address)")
    children.start(ranks)
    logger.info("node %d: ranks %s ready, following node 0", args.node_rank, [name for name, *_ in ranks])
    dead = children.wait_for_death(threading.Event())
    dead.process.join()
    if dead.process.exitcode:
        logger.error("%s exited with code %s", dead.name, dead.process.exitcode)
        return 1
    return 0


def launch(args: ServerArgs) -> int:
    from lightserve.utils.embedded_model import embedded_model_dir

    if not args.graceful_shutdown_s >= 0:
        logger.error("start-up failed: --graceful_shutdown_s must be a number of seconds >= 0")
        return 1
    # uvicorn handles SIGTERM/SIGINT while serving and re-raises the signal after its graceful
    # shutdown; outside that window too, a stop request must run the clean-up below.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    model_dir = args.model_dir or str(embedded_model_dir())
    tokenizer_dir = args.tokenizer_dir or model_dir
    paths = RunPaths.create()
    children = ChildGroup()
    stop_watch = threading.Event()
    try:
        dist_addr = args.dist_init_addr or f"127.0.0.1:{free_port()}"
        ranks = [(f"backend-rank{r}", start_backend_process, (args, paths, model_dir, r, dist_addr))
                 for r in args.ranks_of_node()]
        if args.node_rank > 0:
            return _serve_ranks_only(args, children, ranks)
        others = [("detokenization", start_detokenization_process, (args, paths, tokenizer_dir))]
        if args.enable_multimodal:
            if args.nnodes > 1:  # embeddings travel through this host's shared memory
                raise ChildStartError("--enable_multimodal runs on one node only (--nnodes 1)")
            children.start([("cache_manager", start_cache_manager_process, (args, paths))])
            others.append(("visual", start_visual_process, (args, paths, model_dir)))
        starting = children.spawn(ranks + others)
        # While the children import torch and load the model, this process loads its own side.
        from lightserve.httpserver.app import build_app
        from lightserve.httpserver.images import ImageIntake
        from lightserve.httpserver.manager import HttpServerManager
        from lightserve.utils.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(tokenizer_dir)
        except Exception as e:
            starting.wait()  # a child's own start-up error, if any, names the problem first
            raise ChildStartError(f"cannot load the tokenizer from {tokenizer_dir}: {e}") from e
        backend_info: dict[str, Any] = starting.wait()[0].info
        children.start([("router", start_router_process, (args, paths, backend_info["max_total_token_num"]))])
        logger.info("backend ready: %s", backend_info)

        # The httpserver refuses at the door what could never fit in the pool the backend made.
        args = dataclasses.replace(args, max_total_token_num=backend_info["max_total_token_num"])
        images = ImageIntake.for_server(args, paths, model_dir, tokenizer) if args.enable_multimodal else None
        manager = HttpServerManager(args, paths, tokenizer, images)
        app = build_app(manager, args)
        grace = args.graceful_shutdown_s
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                timeout_graceful_shutdown=grace)
        # Requests still running end with our error a second before uvicorn would cut them
        # (half-way through a grace under 2 s).
        server = _Server(config, manager, fail_after_s=max(grace - 1.0, grace / 2))
        exit_code = 0

        def on_child_death(reason: str) -> None:
            nonlocal exit_code
            exit_code = 1
            logger.error("%s; shutting down", reason)
            manager.fail_all(reason)
            server.should_exit = True

        threading.Thread(target=_watch_children, args=(children, stop_watch, on_child_death), daemon=True).start()
        logger.info("lightserve serving %s on http://%s:%d", model_dir, args.host, args.port)
        server.run()
        return exit_code
    except ChildStartError as e:
        logger.error("start-up failed: %s", e)
        return 1
    except StopRequested:
        logger.info("stopped by signal")
        return 0
    finally:
        stop_watch.set()
        children.stop_all()
        # The cache manager unlinks its segments when terminated; a killed one cannot, so
        # whatever is left of this instance's segments goes here.
        shm.unlink_all(shm.segment_prefix(paths.run_dir))
        paths.remove()


def main(argv: Optional[list[str]] = None) -> None:
    args = ServerArgs.from_cli(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(launch(args))
