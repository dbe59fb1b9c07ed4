"""Micro-benchmark: C decode attention through the token table vs torch gather + SDPA.

The torch path is the plain CPU decode of a TokenAttention cache: gather every request's K/V
through ``req_to_token`` with ``index_select`` into a preallocated padded buffer, then
``scaled_dot_product_attention(enable_gqa=True)`` with a padding mask; a second variant folds
the G query heads of each kv head into the query length instead of enable_gqa (much faster in
bf16 with this torch). The kernel reads the same K/V in place. Both run on the same batch; one "step" calls each once per layer (30, like
a SmolLM2 decode step), every layer with its own KV pool so that, as in serving, K/V come from
memory rather than from a cache warmed by the previous call. Reported: the median over steps
of ms per layer call.

    python benchmarks/cpu_attention.py                 # SmolLM2 shapes, bf16 and fp32
    python benchmarks/cpu_attention.py --batch 128 --dtype bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightserve.backend import cpu_kernels


def make_batch(batch: int, min_ctx: int, max_ctx: int, n_q_heads: int, n_kv_heads: int,
               head_dim: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A decode batch (one layer's pool) whose KV slots are a random permutation of the pool."""
    gen = torch.Generator().manual_seed(seed)
    seq_len = torch.randint(min_ctx, max_ctx + 1, (batch,), generator=gen, dtype=torch.int32)
    n_slots = int(seq_len.sum())
    slots = torch.randperm(n_slots, generator=gen).to(torch.int32)
    req_to_token = torch.zeros(batch, max_ctx, dtype=torch.int32)
    start = 0
    for b, length in enumerate(seq_len.tolist()):
        req_to_token[b, :length] = slots[start:start + length]
        start += length
    return {
        "q": torch.randn(batch, n_q_heads, head_dim, generator=gen).to(dtype),
        "k_cache": torch.randn(n_slots, n_kv_heads, head_dim, generator=gen).to(dtype),
        "v_cache": torch.randn(n_slots, n_kv_heads, head_dim, generator=gen).to(dtype),
        "req_to_token": req_to_token,
        "b_req_idx": torch.arange(batch, dtype=torch.int32),
        "b_seq_len": seq_len,
    }


def layer_pools(data: dict[str, torch.Tensor], layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Independent random K/V pools shaped like data's, one per layer."""
    k = data["k_cache"]
    return [(torch.randn(k.shape).to(k.dtype), torch.randn(k.shape).to(k.dtype)) for _ in range(layers)]


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def torch_gather_sdpa(data: dict[str, torch.Tensor], scale: float, fold_gqa: bool) -> Step:
    """The torch baseline; index/mask/buffers are built once per step and shared by layers.

    fold_gqa=False uses SDPA's enable_gqa; True folds the G query heads of each kv head into the
    query length ([B, Hkv, G, D] against [B, Hkv, L, D]), which torch runs much faster in bf16.
    """
    q = data["q"]
    seq_len = data["b_seq_len"]
    batch, n_q_heads, head_dim = q.shape
    n_kv_heads = data["k_cache"].shape[1]
    pad_len = int(seq_len.max())
    positions = torch.arange(pad_len)
    valid = positions[None, :] < seq_len[:, None]  # [B, Lpad]
    # Padding positions read slot 0 and are masked out.
    index = torch.where(valid, data["req_to_token"][data["b_req_idx"].long(), :pad_len], 0)
    index = index.reshape(-1).long()
    mask = valid[:, None, None, :]  # [B, 1, 1, Lpad], broadcast over heads
    k_buf = torch.empty(batch * pad_len, n_kv_heads, head_dim, dtype=q.dtype)
    v_buf = torch.empty_like(k_buf)
    group = n_q_heads // n_kv_heads
    q4 = q.view(batch, n_kv_heads, group, head_dim) if fold_gqa else q.unsqueeze(2)

    def run(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.index_select(k, 0, index, out=k_buf)
        torch.index_select(v, 0, index, out=v_buf)
        kk = k_buf.view(batch, pad_len, n_kv_heads, head_dim).transpose(1, 2)
        vv = v_buf.view(batch, pad_len, n_kv_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q4, kk, vv, attn_mask=mask, scale=scale, enable_gqa=not fold_gqa)
        return out.reshape(batch, n_q_heads, head_dim)

    return run


def kernel(data: dict[str, torch.Tensor], scale: float) -> Step:
    out = torch.empty_like(data["q"])
    index = {name: data[name] for name in ("req_to_token", "b_req_idx", "b_seq_len")}
    return lambda k, v: cpu_kernels.token_decode_attention(data["q"], k, v, **index, scale=scale, out=out)


def median_ms_per_call(fn: Step, pools: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> float:
    """Median over steps of (time for one call per layer pool) / layers, after one warm-up step."""
    per_call = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        for k, v in pools:
            fn(k, v)
        if step > 0:
            per_call.append((time.perf_counter() - t0) * 1e3 / len(pools))
    return statistics.median(per_call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-ctx", type=int, default=128)
    parser.add_argument("--max-ctx", type=int, default=384)
    parser.add_argument("--q-heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30, help="layers (own KV pool, one call each) per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median taken)")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "both"], default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"kernel unavailable: {cpu_kernels.unavailable_reason()}")
    dtypes = {"bf16": [torch.bfloat16], "fp32": [torch.float32], "both": [torch.bfloat16, torch.float32]}[args.dtype]
    scale = args.head_dim ** -0.5
    print(f"B={args.batch} ctx={args.min_ctx}..{args.max_ctx} Hq={args.q_heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} threads={torch.get_num_threads()} layers={args.layers} steps={args.steps}")
    for dtype in dtypes:
        data = make_batch(args.batch, args.min_ctx, args.max_ctx, args.q_heads, args.kv_heads,
                          args.head_dim, dtype)
        pools = layer_pools(data, args.layers)
        fused = kernel(data, scale)
        t_kernel = median_ms_per_call(fused, pools, args.steps)
        name = str(dtype).removeprefix("torch.")
        print(f"{name:9s} kernel (through the table)         {t_kernel:7.3f} ms/layer")
        for fold, label in ((False, "gather + SDPA(enable_gqa)"), (True, "gather + SDPA(GQA folded)")):
            baseline = torch_gather_sdpa(data, scale, fold_gqa=fold)
            err = (baseline(*pools[0]).float() - fused(*pools[0]).float()).abs().max().item()
            t_torch = median_ms_per_call(baseline, pools, args.steps)
            print(f"{name:9s} torch {label:28s} {t_torch:7.3f} ms/layer | kernel speed-up "
                  f"{t_torch / t_kernel:5.2f}x | max|diff| {err:.2e}")


if __name__ == "__main__":
    main()
