"""Decode step time at tp=1 and tp=2 (gloo on CPU), with the all-reduce share of the tp=2 step.

Every rank runs the engine on its shard in its own process, as the server does; rank 0 reports
the median decode step and the time spent inside all-reduce / all-gather calls.

    python benchmarks/tp_decode.py --batches 8,64 --data_type bfloat16
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightserve.backend.engine import ModelEngine
from lightserve.backend.parallel import TensorParallel
from lightserve.io_struct import GenerateReq, SamplingParams, StepPlan
from lightserve.server_args import ServerArgs


class TimedTensorParallel(TensorParallel):
    """TensorParallel that adds up the seconds its collectives take."""

    comm_s = 0.0

    def all_reduce(self, x):
        t0 = time.perf_counter()
        out = super().all_reduce(x)
        TimedTensorParallel.comm_s += time.perf_counter() - t0
        return out

    def all_gather_last_dim(self, x):
        t0 = time.perf_counter()
        out = super().all_gather_last_dim(x)
        TimedTensorParallel.comm_s += time.perf_counter() - t0
        return out


def run_rank(rank: int, world: int, port: int, a, results) -> None:
    torch.set_num_threads(max(1, 2 // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    args = ServerArgs(device="cpu", data_type=a.data_type, max_total_token_num=256 * (a.prompt_len + a.steps + 4),
                      max_req_total_len=a.prompt_len + a.steps + 4, running_max_req_size=256)
    engine = ModelEngine(args, a.model_dir, TimedTensorParallel(rank, world))
    sp = SamplingParams(max_new_tokens=a.steps + 2, temperature=0.0, ignore_eos=True)
    out = {}
    for batch in a.batches:
        prompts = [[100 + (i * 7 + j) % 30000 for j in range(a.prompt_len)] for i in range(batch)]
        engine.step(StepPlan.admit_whole([GenerateReq(i, p, sp) for i, p in enumerate(prompts)]))
        engine.step(StepPlan(decode=True))
        steps, comms = [], []
        for _ in range(a.steps):
            TimedTensorParallel.comm_s = 0.0
            t0 = time.perf_counter()
            engine.step(StepPlan(decode=True))
            steps.append(time.perf_counter() - t0)
            comms.append(TimedTensorParallel.comm_s)
        engine.release_all()
        out[batch] = (statistics.median(steps) * 1e3, statistics.median(comms) * 1e3)
    if rank == 0:
        results.put(out)
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, a) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run_rank, args=(r, world, port, a, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = results.get()
    for p in procs:
        p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--data_type", default="bfloat16")
    a = ap.parse_args()
    a.batches = [int(b) for b in a.batches.split(",")]
    if a.model_dir is None:
        from lightserve.utils.embedded_model import embedded_model_dir

        a.model_dir = str(embedded_model_dir())
    tp1, tp2 = measure(1, a), measure(2, a)
    print(f"{'batch':>5} | {'tp=1 step ms':>12} | {'tp=2 step ms':>12} | {'tp=2 comm ms':>12} | comm share | tp2/tp1")
    for b in a.batches:
        (s1, _), (s2, c2) = tp1[b], tp2[b]
        print(f"{b:5d} | {s1:12.1f} | {s2:12.1f} | {c2:12.1f} | {100 * c2 / s2:9.1f}% | {s2 / s1:6.2f}x")


if __name__ == "__main__":
    main()
