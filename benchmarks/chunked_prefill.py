"""Chunked prefill beside whole-prompt prefill: the same streaming workload on one server per
`--chunked_prefill_size`, run one after the other in the same process, with the ratios printed.

What it shows: with long prompts arriving while other requests stream, a whole-prompt prefill stops
every stream for the whole pass (inter-token latency p99 and max); chunks of the step budget keep
every step short, at no loss of throughput.

    python benchmarks/chunked_prefill.py --model_dir ~/.cache/lightserve/models/SmolLM2-135M-Instruct \\
        --sizes 0,256,512 --num-requests 128 --prompt-len 32:2048 --output-len 32:256 --max-concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math

from transformers import AutoTokenizer

from lightserve.benchmark.client import run_load, warm_up
from lightserve.benchmark.launch import LaunchedServer
from lightserve.benchmark.report import cpu_name
from lightserve.benchmark.stats import RunSummary, summarize
from lightserve.benchmark.workload import LengthSpec, synthetic_workload




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--sizes", default="0,512", help="chunked_prefill_size values; the first is the baseline")
    p.add_argument("--num-requests", type=int, default=128)
    p.add_argument("--prompt-len", type=LengthSpec.parse, default=LengthSpec(32, 2048))
    p.add_argument("--output-len", type=LengthSpec.parse, default=LengthSpec(32, 256))
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-args", default="", help="extra flags for every server, one string")
    p.add_argument("--output-json", default="chunked_prefill.json")
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    requests = synthetic_workload(AutoTokenizer.from_pretrained(a.model_dir), a.num_requests, a.prompt_len,
                                  a.output_len, a.seed)
    longest = max(len(r.prompt_ids) + r.output_len for r in requests)
    runs: dict[int, RunSummary] = {}
    for size in sizes:
        extra = ["--chunked_prefill_size", str(size), "--max_req_total_len", str(longest),
                 "--batch_max_tokens", str(longest), *a.server_args.split()]
        with LaunchedServer(a.model_dir, a.dtype, extra) as server:
            asyncio.run(warm_up(server.url, requests[0]))
            result = asyncio.run(run_load(server.url, requests, math.inf, a.max_concurrency, seed=a.seed,
                                          progress=False))
        runs[size] = summarize(result)
        print(f"chunked_prefill_size={size}: done, {runs[size].failed} failed", flush=True)
    base = runs[sizes[0]]
    print(f"\nmachine: {cpu_name()}, {a.num_requests} requests, prompts {a.prompt_len}, outputs {a.output_len}, "
          f"concurrency {a.max_concurrency}, dtype {a.dtype}")
    head = (f"{'chunk':>6s} {'out tok/s':>10s} {'ratio':>6s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
            f"{'ITL p50':>8s} {'ITL p99':>8s} {'ITL max':>8s} {'p99/p50':>8s}")
    print(head)
    for size, s in runs.items():
        print(f"{size:6d} {s.output_throughput:10.1f} {s.output_throughput / base.output_throughput:6.3f} "
              f"{s.ttft_ms.p50:9.0f} {s.ttft_ms.p99:9.0f} {s.itl_ms.p50:8.1f} {s.itl_ms.p99:8.1f} "
              f"{s.itl_ms.max:8.0f} {s.itl_ms.p99 / s.itl_ms.p50:8.2f}")
    with open(a.output_json, "w") as f:
        json.dump({"machine": cpu_name(), "args": {k: str(v) for k, v in vars(a).items()},
                   "runs": {size: s.to_json() for size, s in runs.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
