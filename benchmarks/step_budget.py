"""How long one step takes with B decode rows plus a prompt chunk of N tokens, in process.

This is the measurement behind the default `--chunked_prefill_size`: the budget should let a
step with a chunk take at most about twice a pure decode step (so inter-token latency p99 stays
within 2x its p50 while long prompts arrive) while the chunks are large enough that prompt
tokens cost little more per token than in a whole-prompt prefill.

    python benchmarks/step_budget.py --batch 64 --chunks 0,64,128,256,512,1024
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightserve.backend.engine import ModelEngine
from lightserve.io_struct import Chunk, GenerateReq, SamplingParams, StepPlan
from lightserve.server_args import ServerArgs
from lightserve.utils.embedded_model import embedded_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", default=None)
    p.add_argument("--data_type", default="auto")
    p.add_argument("--batch", type=int, default=64, help="decoding requests")
    p.add_argument("--context", type=int, default=300, help="prompt length of the decoding requests")
    p.add_argument("--chunks", default="0,64,128,256,512,1024")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    chunks = [int(x) for x in a.chunks.split(",")]
    args = ServerArgs(data_type=a.data_type, max_total_token_num=a.batch * (a.context + 200) + 4 * max(chunks) * a.repeats,
                      max_req_total_len=max(4096, max(chunks) * (a.repeats + 1) + 200), running_max_req_size=a.batch + 64)
    engine = ModelEngine(args, str(a.model_dir or embedded_model_dir()))
    torch.manual_seed(0)
    vocab = engine.cfg.vocab_size
    sp = SamplingParams(max_new_tokens=150, temperature=0.0, ignore_eos=True)
    decoding = [GenerateReq(i, torch.randint(3, vocab, (a.context,)).tolist(), sp) for i in range(a.batch)]
    engine.step(StepPlan.admit_whole(decoding))
    for _ in range(3):
        engine.step(StepPlan(decode=True))
    print(f"{engine.cfg.architecture} {engine.dtype}, attention {engine.attention_backend}, "
          f"{a.batch} decode rows at context ~{a.context}, {torch.get_num_threads()} threads")
    print(f"{'chunk':>6s} {'step ms':>8s} {'x decode':>9s} {'ms/prompt tok':>14s}")
    base = None
    next_id = a.batch
    for n in chunks:
        times = []
        long = GenerateReq(next_id, torch.randint(3, vocab, (max(n, 1) * (a.repeats + 1) + 1,)).tolist(), sp)
        next_id += 1
        if n:
            engine.step(StepPlan(new_reqs=[long], chunks=[Chunk(long.req_id, n)], decode=True))
        for _ in range(a.repeats):
            plan = StepPlan(chunks=[Chunk(long.req_id, n)] if n else [], decode=True)
            t0 = time.perf_counter()
            engine.step(plan)
            times.append(time.perf_counter() - t0)
        if n:
            engine.step(StepPlan(release=[long.req_id]))
        ms = statistics.median(times) * 1e3
        base = base or ms
        extra = f"{(ms - base) / n:14.3f}" if n else f"{'':>14s}"
        print(f"{n:6d} {ms:8.1f} {ms / base:9.2f} {extra}", flush=True)


if __name__ == "__main__":
    main()
