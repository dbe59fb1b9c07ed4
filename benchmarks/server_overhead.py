"""What the router, IPC, detokenization and HTTP add to each decode step.

Same batch, same prompts, same run: (1) the engine alone decodes a batch of B requests in-process
and the median step time is taken; (2) the server decodes the same B requests (streamed over
HTTP, all in one running batch) and the median inter-token time during the steady phase is
taken. overhead = (inter-token time - engine step) / inter-token time.

    python benchmarks/server_overhead.py --batch 64 --data_type bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import torch

from lightserve.backend.engine import ModelEngine
from lightserve.benchmark.launch import LaunchedServer
from lightserve.io_struct import GenerateReq, SamplingParams, StepPlan
from lightserve.server_args import ServerArgs


def make_prompts(tokenizer, batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Token-id prompts that survive a decode/encode round trip, so both sides see the same ids."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    while len(prompts) < batch:
        ids = torch.randint(1000, 20000, (prompt_len,), generator=g).tolist()
        ids = tokenizer(tokenizer.decode(ids)).input_ids[:prompt_len]
        if len(ids) == prompt_len and tokenizer(tokenizer.decode(ids)).input_ids == ids:
            prompts.append(ids)
    return prompts


def engine_step_ms(args: ServerArgs, model_dir: str, prompts: list[list[int]], steps: int) -> float:
    engine = ModelEngine(args, model_dir)
    sp = SamplingParams(max_new_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    engine.step(StepPlan.admit_whole([GenerateReq(i, p, sp) for i, p in enumerate(prompts)]))
    times = []
    for _ in range(steps - 1):
        t0 = time.perf_counter()
        engine.step(StepPlan(decode=True))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[len(times) // 4:]) * 1e3


async def server_itl_ms(url: str, texts: list[str], steps: int) -> float:
    """Median gap between consecutive tokens of all streams, over the middle half of the run."""
    arrivals: list[list[float]] = [[] for _ in texts]

    async def one(i: int, client: httpx.AsyncClient) -> None:
        body = {"inputs": texts[i], "parameters": {"max_new_tokens": steps, "ignore_eos": True}}
        async with client.stream("POST", url + "/generate_stream", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    arrivals[i].append(time.perf_counter())

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(texts))) as client:
        await asyncio.gather(*(one(i, client) for i in range(len(texts))))
    gaps = [b - a for times in arrivals for a, b in zip(times[steps // 4: 3 * steps // 4], times[steps // 4 + 1: 3 * steps // 4 + 1])]
    return statistics.median(gaps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--data_type", default="bfloat16")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from lightserve.utils.embedded_model import embedded_model_dir

    model_dir = a.model_dir or str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(tokenizer, a.batch, a.prompt_len, seed=0)
    pool = a.batch * (a.prompt_len + a.steps + 8)
    args = ServerArgs(device="cpu", data_type=a.data_type, max_total_token_num=pool,
                      max_req_total_len=a.prompt_len + a.steps + 8, running_max_req_size=a.batch)
    step = engine_step_ms(args, model_dir, prompts, a.steps)
    flags = ["--device", "cpu", "--max_total_token_num", str(pool), "--max_req_total_len", str(args.max_req_total_len),
             "--running_max_req_size", str(a.batch), "--log_level", "warning"]
    with LaunchedServer(model_dir, a.data_type, flags) as server:
        asyncio.run(server_itl_ms(server.url, [tokenizer.decode(p) for p in prompts[:4]], 8))  # warm-up
        itl = asyncio.run(server_itl_ms(server.url, [tokenizer.decode(p) for p in prompts], a.steps))
    overhead = (itl - step) / itl
    print(json.dumps({"batch": a.batch, "dtype": a.data_type, "engine_step_ms": round(step, 2),
                      "server_inter_token_ms": round(itl, 2), "overhead_share": round(overhead, 4)}))
    print(f"B={a.batch} {a.data_type}: engine step {step:.1f} ms, served inter-token {itl:.1f} ms -> "
          f"router + IPC + detokenization + HTTP add {100 * overhead:.1f}% of the step")


if __name__ == "__main__":
    main()
