"""Micro-benchmark of the Triton decode kernel against the torch path and dense SDPA (CUDA only).

For each batch size and context length, every request holds `context` positions whose KV slots
are a random permutation of the pool (the fragmented case the token table exists for). Timed,
per layer call (the per-step planning of each back end, `begin_step`, is done once outside):

- triton: `TritonAttention.decode` — split-K flash decoding through the token table in place.
- torch:  `TorchAttention.decode` — gather K/V through the table, then SDPA with a padding mask.
- sdpa:   `scaled_dot_product_attention(enable_gqa=True)` on K/V already dense and padded-free
          ([B, Hkv, L, D]); a lower bound no paged cache reaches, shown for scale.

Reported: median ms (triton.testing.do_bench), the ratios torch/triton and sdpa/triton, and the
K/V bandwidth the triton kernel reaches. On a machine without a GPU it says so and exits 0.

    python benchmarks/triton_kernels.py                                   # Llama-3-8B-like heads, bf16
    python benchmarks/triton_kernels.py --heads 9 --kv-heads 3 --head-dim 64   # SmolLM2-135M heads
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,8,32,64,128,256", help="comma-separated batch sizes")
    parser.add_argument("--context", default="128,512,1024,4096", help="comma-separated context lengths")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    return parser.parse_args()


def decode_inputs(batch: int, context: int, args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """q, the pool, and a decode ForwardState whose slots are scattered over the pool."""
    from lightserve.backend.forward_state import ForwardState

    n_slots = batch * context
    req_to_token = torch.randperm(n_slots, device=device).to(torch.int32).view(batch, context)
    k_cache = torch.randn(n_slots, args.kv_heads, args.head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, args.heads, args.head_dim, device=device, dtype=dtype)
    seq_len = torch.full((batch,), context, dtype=torch.int32, device=device)

    def state() -> ForwardState:
        # Each back end stores its own per-step metadata in the state: one state per back end.
        return ForwardState(positions=(seq_len - 1).long(), out_slots=req_to_token[:, -1].long(),
                            b_req_idx=torch.arange(batch, dtype=torch.int32, device=device), b_seq_len=seq_len,
                            req_to_token=req_to_token, num_decode=batch, max_seq_len=context)

    return q, k_cache, v_cache, state


def bench_one(batch: int, context: int, args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> dict:
    from triton.testing import do_bench

    from lightserve.backend.attention import TorchAttention
    from lightserve.backend.kernels.triton_attention import TritonAttention
    from lightserve.backend.mem_manager import LayerKV

    q, k_cache, v_cache, make_state = decode_inputs(batch, context, args, dtype, device)
    results = {}
    for name, backend in (("triton", TritonAttention), ("torch", TorchAttention)):
        attn = backend(args.heads, args.kv_heads, args.head_dim)
        state = make_state()
        attn.begin_step(state)
        results[name] = do_bench(lambda: attn.decode(q, LayerKV(k_cache, v_cache), state))
    dense_k = k_cache.view(batch, context, args.kv_heads, args.head_dim).transpose(1, 2).contiguous()
    dense_v = v_cache.view(batch, context, args.kv_heads, args.head_dim).transpose(1, 2).contiguous()
    q4 = q.unsqueeze(2)
    results["sdpa"] = do_bench(lambda: F.scaled_dot_product_attention(q4, dense_k, dense_v, enable_gqa=True))
    kv_bytes = 2 * k_cache.numel() * k_cache.element_size()
    results["triton_gbps"] = kv_bytes / (results["triton"] * 1e-3) / 1e9
    return results


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py needs a CUDA GPU: compiled Triton kernels cannot launch on this machine "
              "(the interpreter is for correctness tests only). Nothing measured.")
        return 0
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name(device)}, {args.dtype}, heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}; median ms per layer call")
    print(f"{'batch':>5} {'context':>7} {'triton':>8} {'torch':>8} {'sdpa':>8} {'torch/triton':>12} "
          f"{'sdpa/triton':>11} {'triton GB/s':>11}")
    for batch in (int(b) for b in args.batch.split(",")):
        for context in (int(c) for c in args.context.split(",")):
            r = bench_one(batch, context, args, dtype, device)
            print(f"{batch:>5} {context:>7} {r['triton']:>8.3f} {r['torch']:>8.3f} {r['sdpa']:>8.3f} "
                  f"{r['torch'] / r['triton']:>12.2f} {r['sdpa'] / r['triton']:>11.2f} {r['triton_gbps']:>11.0f}")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
