"""One backend rank: an rpyc service on a unix socket, or a follower on another node.

The router sends the same `StepPlan` to every rank of this node, once per step; each rank runs
the same step on its shard and the ranks meet in the torch.distributed collectives inside the
model. Ranks on other nodes (multi-node tensor parallelism) cannot be reached by the router's
unix sockets: rank 0 forwards every call to them over torch.distributed before running it, and
they run it in lock-step. Calls and results cross every link as msgspec msgpack bytes, decoded
into their declared types only (no pickle).
"""

from __future__ import annotations

import logging
import os
from multiprocessing.connection import Connection
from typing import Any, Optional

import rpyc
import torch
import torch.distributed as dist
from rpyc.utils.server import OneShotServer

from lightserve.backend.engine import ModelEngine
from lightserve.backend.parallel import TensorParallel
from lightserve.cache_manager import shm
from lightserve.io_struct import RankCall, Shutdown, StepResult
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.process import run_child
from lightserve.utils.rpc import RPYC_CONFIG
from lightserve.utils.run_paths import RunPaths

logger = logging.getLogger(__name__)

class RankRunner:
    """Runs the router's calls on this rank's engine (and forwards them to other nodes)."""

    def __init__(self, engine: ModelEngine, forward_group: Optional[Any] = None):
        self.engine = engine
        self.forward_group = forward_group  # rank 0 of a multi-node run: the group of remote ranks
        self.calls = 0  # StepPlans run: one per router step

    def run(self, payload: bytes) -> bytes:
        if self.forward_group is not None:
            broadcast_bytes(payload, self.forward_group)
        return serde.dumps(self.execute(serde.RANK_IN.decode(payload)))

    def execute(self, call: RankCall) -> Optional[StepResult]:
        if isinstance(call, Shutdown):
            return None
        self.calls += 1
        return self.engine.step(call)


class ModelWorkerService(rpyc.Service):
    def __init__(self, runner: RankRunner):
        super().__init__()
        self.runner = runner

    def exposed_call(self, payload: bytes) -> bytes:
        return self.runner.run(payload)


def broadcast_bytes(payload: Optional[bytes], group, src: int = 0) -> bytes:
    """Send `payload` from `src` to every rank of `group` (length first, then the bytes)."""
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
    dist.broadcast(size, src, group=group)
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload is not None
            else torch.empty(int(size), dtype=torch.uint8))
    dist.broadcast(data, src, group=group)
    return data.numpy().tobytes()


def follow(runner: RankRunner, group) -> None:
    """Remote-node rank: run what rank 0 forwards until it says shutdown or goes away."""
    while True:
        try:
            call = serde.RANK_IN.decode(broadcast_bytes(None, group))
        except RuntimeError as e:  # gloo: the connection to node 0 closed
            logger.info("node 0 went away (%s); stopping", str(e).splitlines()[0][:120])
            # Leave at once: the process group is broken, and tearing it down at interpreter
            # exit can abort in gloo's destructors ("terminate called without an active
            # exception", exit code -6), which would look like a crash.
            logging.shutdown()
            os._exit(0)
        if isinstance(call, Shutdown):
            return
        runner.execute(call)


def _init_distributed(args: ServerArgs, rank: int, dist_addr: str) -> Optional[Any]:
    """Join the rank group; return the forwarding group (rank 0 + other nodes' ranks) if any."""
    if args.tp == 1:
        return None
    backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{dist_addr}", rank=rank, world_size=args.tp)
    if args.nnodes == 1:
        return None
    remote = [r for r in range(args.tp) if r >= args.tp // args.nnodes]
    # Every rank must create every group, in the same order. Control messages use gloo even
    # when the model's collectives use NCCL: they are small and live on the CPU.
    return dist.new_group([0, *remote], backend="gloo")


GRAMMAR_PREPARE_AFTER_S = 10.0


def start_backend_process(args: ServerArgs, paths: Optional[RunPaths], model_dir: str, rank: int, dist_addr: str,
                          pipe: Connection) -> None:
    def setup():
        # Each rank gets its share of this node's cores; oversubscription makes every collective wait.
        per_node = args.tp // args.nnodes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
        forward_group = _init_distributed(args, rank, dist_addr)
        # Every rank reads the same full-width image embeddings from the cache manager's segments.
        prefix = shm.segment_prefix(paths.run_dir) if args.enable_multimodal and paths is not None else None
        engine = ModelEngine(args, model_dir, TensorParallel(rank, args.tp), shm_prefix=prefix)
        # Built on a thread once the other processes have started (it would slow their start-up).
        engine.prepare_grammars(after_s=GRAMMAR_PREPARE_AFTER_S)
        info = {"max_total_token_num": engine.mem.size, "vocab_size": engine.cfg.vocab_size,
                "attention_backend": engine.attention_backend, "dtype": str(engine.dtype)}
        if args.node_rank > 0:
            return (lambda: follow(RankRunner(engine), forward_group)), info
        runner = RankRunner(engine, forward_group if rank == 0 else None)
        # One router connection per server; OneShotServer serves it in this thread and returns
        # when the router goes away.
        server = OneShotServer(ModelWorkerService(runner), socket_path=paths.worker_socket(rank),
                               protocol_config=RPYC_CONFIG)
        return server.start, info

    run_child(f"backend-rank{rank}", pipe, args.log_level, setup)
