"""One backend rank as an rpyc service on a unix socket in the run directory.

The router calls the same method on every rank; each rank runs the same step on its shard
and the ranks meet in the torch.distributed collectives inside the model. Arguments and
results cross the socket as `serde` bytes (no pickle, no netrefs).
"""

from __future__ import annotations

import logging
import os
import time
from multiprocessing.connection import Connection
from typing import Callable

import rpyc
import torch
import torch.distributed as dist
from rpyc.utils.server import OneShotServer

from lightserve.backend.engine import ModelEngine
from lightserve.backend.parallel import TensorParallel
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.process import run_child
from lightserve.utils.run_paths import RunPaths

logger = logging.getLogger(__name__)

# rpyc hardening: only `exposed_` methods are reachable, no attribute access, no pickles.
RPYC_CONFIG = {
    "allow_public_attrs": False,
    "allow_all_attrs": False,
    "allow_pickle": False,
    "allow_setattr": False,
    "allow_delattr": False,
    "sync_request_timeout": None,
}


class ModelWorkerService(rpyc.Service):
    def __init__(self, engine: ModelEngine):
        super().__init__()
        self.engine = engine
        self.last_step_s = 0.0  # time of the last prefill/decode inside this rank

    def _timed(self, fn: Callable, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.last_step_s = time.perf_counter() - t0
        return out

    def exposed_prefill(self, batch_id: int, reqs: bytes) -> bytes:
        return serde.dumps(self._timed(self.engine.prefill, batch_id, serde.loads(reqs)))

    def exposed_decode(self, batch_id: int) -> bytes:
        return serde.dumps(self._timed(self.engine.decode, batch_id))

    def exposed_filter(self, batch_id: int, keep_req_ids: bytes) -> None:
        self.engine.filter(batch_id, serde.loads(keep_req_ids))

    def exposed_merge(self, batch_id: int, other_id: int) -> None:
        self.engine.merge(batch_id, other_id)

    def exposed_pause(self, batch_id: int, req_ids: bytes) -> bytes:
        return serde.dumps(self.engine.pause(batch_id, serde.loads(req_ids)))

    def exposed_remove(self, batch_id: int) -> None:
        self.engine.remove(batch_id)

    def exposed_stats(self) -> bytes:
        return serde.dumps({**self.engine.stats(), "last_step_s": self.last_step_s})


def _init_distributed(args: ServerArgs, rank: int, world_size: int, dist_addr: str) -> None:
    if world_size == 1:
        return
    backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{dist_addr}", rank=rank, world_size=world_size)


def start_backend_process(args: ServerArgs, paths: RunPaths, model_dir: str, rank: int, world_size: int,
                          dist_addr: str, pipe: Connection) -> None:
    def setup():
        # Each rank gets its share of the cores; oversubscription makes every collective wait.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world_size)))
        _init_distributed(args, rank, world_size, dist_addr)
        engine = ModelEngine(args, model_dir, TensorParallel(rank, world_size))
        socket_path = paths.worker_socket(rank)
        # One router connection per server; OneShotServer serves it in this thread and returns
        # when the router goes away.
        server = OneShotServer(ModelWorkerService(engine), socket_path=socket_path, protocol_config=RPYC_CONFIG)
        info = {"max_total_token_num": engine.mem.size, "vocab_size": engine.cfg.vocab_size,
                "attention_backend": engine.attention_backend, "dtype": str(engine.dtype)}
        return server.start, info

    run_child(f"backend-rank{rank}", pipe, args.log_level, setup)
