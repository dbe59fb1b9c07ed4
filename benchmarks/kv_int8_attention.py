"""Micro-benchmark: C decode attention over an int8 KV pool against a bf16 one (issue 16).

SmolLM2-135M's attention (9 q heads, 3 kv heads, head_dim 64, bf16 queries) at serving batch
sizes. Each pool is a lightserve `MemoryManager` (bf16, or --kv_cache_dtype int8 with its
per-token-and-head scales) and its slots are handed out as a server hands them out: a request's
prompt in one allocation (a contiguous window when one is free), then one slot per request per
decode step, so the tokens a request generated lie a batch apart ("pool"); "random" scatters
every position (a random permutation: the worst case for memory latency). Every layer has its
own pool, as in serving, so K/V come from memory rather than from a cache warmed by the previous
call; bf16 and int8 calls alternate, so both see the same machine. Reported: the median over
repeats of ms per call, and bf16 / int8.

    python benchmarks/kv_int8_attention.py
    python benchmarks/kv_int8_attention.py --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightserve.backend import cpu_kernels
from lightserve.backend.mem_manager import LayerKV, MemoryManager, quantize_kv
from lightserve.benchmark.report import cpu_name

Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64




def slot_table(lens: list[int], layout: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """req_to_token [B, max(lens)] and the pool size, slots laid out as `layout` says."""
    batch, total = len(lens), sum(lens)
    table = torch.zeros(batch, max(lens), dtype=torch.int32)
    if layout == "random":
        perm = torch.randperm(total, generator=gen).to(torch.int32)
        start = 0
        for b, n in enumerate(lens):
            table[b, :n] = perm[start:start + n]
            start += n
        return table, total
    # Requests arrive in random order with prompts of 50-100 % of their context, then decode
    # together until each has its length; slot allocation is the pool's own.
    allocator = MemoryManager(total, torch.bfloat16, 1, 1, 1)
    have = [max(1, n - int(torch.randint(0, n // 2 + 1, (1,), generator=gen))) for n in lens]
    for b in torch.randperm(batch, generator=gen).tolist():
        table[b, :have[b]] = allocator.alloc(have[b]).to(torch.int32)
    while decoding := [b for b in range(batch) if have[b] < lens[b]]:
        for b, slot in zip(decoding, allocator.alloc(len(decoding)).tolist()):
            table[b, have[b]] = slot
            have[b] += 1
    return table, total


def pools(size: int, layers: int, gen: torch.Generator) -> tuple[list[LayerKV], list[LayerKV]]:
    """The same random K/V in a bf16 pool and, quantized, in an int8 pool, one per layer."""
    bf16 = MemoryManager(size, torch.bfloat16, KV_HEADS, HEAD_DIM, layers).layers
    int8 = MemoryManager(size, torch.bfloat16, KV_HEADS, HEAD_DIM, layers, kv_dtype=torch.int8).layers
    for plain, quantized in zip(bf16, int8):
        for name in ("k", "v"):
            values = torch.randn(size, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
            getattr(plain, name).copy_(values)
            q, scale = quantize_kv(values)
            getattr(quantized, name).copy_(q)
            getattr(quantized, f"{name}_scale").copy_(scale)
    return bf16, int8


def run(batch: int, min_ctx: int, max_ctx: int, layout: str, layers: int, repeats: int) -> tuple[float, float]:
    """Median ms per call over repeats x layers calls: (bf16 pool, int8 pool)."""
    gen = torch.Generator().manual_seed(batch * 7 + max_ctx)
    lens = torch.randint(min_ctx, max_ctx + 1, (batch,), generator=gen).tolist()
    table, size = slot_table(lens, layout, gen)
    bf16, int8 = pools(size, layers, gen)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    index = dict(req_to_token=table, b_req_idx=torch.arange(batch, dtype=torch.int32),
                 b_seq_len=torch.tensor(lens, dtype=torch.int32), scale=HEAD_DIM ** -0.5, out=out)
    times: dict[str, list[float]] = {"bf16": [], "int8": []}
    for repeat in range(repeats + 1):  # the first round warms up (page faults, thread pool)
        for plain, quantized in zip(bf16, int8):
            for name, kv in (("bf16", plain), ("int8", quantized)):
                t0 = time.perf_counter()
                cpu_kernels.token_decode_attention(q, kv.k, kv.v, k_scale=kv.k_scale, v_scale=kv.v_scale, **index)
                if repeat:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times["bf16"]), statistics.median(times["int8"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[56, 64])
    parser.add_argument("--layouts", nargs="+", choices=["pool", "random"], default=["pool", "random"])
    parser.add_argument("--layers", type=int, default=8, help="layers, each with its own pools (8 x >= 25 MB: beyond L3)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds over the layers (median taken)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"kernels unavailable: {cpu_kernels.unavailable_reason()}")
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; {Q_HEADS} q / {KV_HEADS} kv "
          f"heads, head_dim {HEAD_DIM}, bf16 q; {args.layers} layers x {args.repeats} repeats, medians")
    print(f"{'batch':>5} {'contexts':>10} {'slots':>7} {'bf16 ms':>8} {'int8 ms':>8} {'bf16/int8':>9}")
    for batch in args.batches:
        for min_ctx, max_ctx in ((256, 1024), (1024, 1024)):
            for layout in args.layouts:
                t_bf16, t_int8 = run(batch, min_ctx, max_ctx, layout, args.layers, args.repeats)
                contexts = f"{min_ctx}..{max_ctx}" if min_ctx != max_ctx else f"{max_ctx}"
                print(f"{batch:>5} {contexts:>10} {layout:>7} {t_bf16:8.3f} {t_int8:8.3f} {t_bf16 / t_int8:8.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
