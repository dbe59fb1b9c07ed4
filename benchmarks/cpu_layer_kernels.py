"""Micro-benchmark: the C prefill attention and layer ops against the torch ops they replace.

Prefill attention: one request of L new tokens, causal, SmolLM2 heads (9 query, 3 kv, head
dim 64), bf16: `cpu_kernels.context_attention` vs `scaled_dot_product_attention(is_causal=True,
enable_gqa=True)` (torch's CPU flash attention). Layer ops: `CpuOps` vs `TorchOps` on SmolLM2
widths (hidden 576, intermediate 1536, q/k/v views of a fused qkv row) at a decode batch and a
prefill pass. Reported: median ms per call and the speed-up.

    python benchmarks/cpu_layer_kernels.py
    python benchmarks/cpu_layer_kernels.py --lengths 128,1024 --rows 8,512
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lightserve.backend import cpu_kernels
from lightserve.backend.cpu_kernels import CpuOps
from lightserve.backend.models.torch_ops import TorchOps
from lightserve.backend.mem_manager import LayerKV

HQ, HKV, D, HIDDEN, INTER = 9, 3, 64, 576, 1536


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_rows(lengths: list[int], repeats: int) -> None:
    if not cpu_kernels.context_attention_supported():
        print("prefill attention: this CPU or build lacks AVX512-BF16; skipped")
        return
    print(f"prefill attention, bf16, Hq={HQ} Hkv={HKV} D={D} (ms per call; GFLOP/s counts the causal half)")
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(n, h, D, generator=gen).to(torch.bfloat16) for h in (HQ, HKV, HKV))
        starts, lens = torch.tensor([0]), torch.tensor([n])
        ours = median_ms(lambda: cpu_kernels.context_attention(q, k, v, starts, lens, D ** -0.5), repeats)
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
        sdpa = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=D ** -0.5,
                                                                enable_gqa=True), repeats)
        gflops = 4 * n * n / 2 * HQ * D / 1e6
        print(f"  L={n:5d}  C {ours:7.3f} ({gflops / ours:5.0f} GFLOP/s)  SDPA {sdpa:7.3f} "
              f"({gflops / sdpa:5.0f} GFLOP/s)  speed-up {sdpa / ours:5.2f}x")


def layer_op_rows(row_counts: list[int], repeats: int) -> None:
    print("layer ops, bf16 (ms per call)")
    for rows in row_counts:
        gen = torch.Generator().manual_seed(rows)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(torch.bfloat16)

        x, delta, w = randn(rows, HIDDEN), randn(rows, HIDDEN), randn(HIDDEN)
        gate_up = randn(rows, 2 * INTER)
        qkv = randn(rows, (HQ + 2 * HKV) * D)
        q, k, v = (qkv[:, a * D: b * D].view(rows, b - a, D) for a, b in ((0, HQ), (HQ, HQ + HKV), (HQ + HKV, HQ + 2 * HKV)))
        angles = torch.rand(rows, D // 2, generator=gen) * 100
        cos, sin = angles.cos(), angles.sin()
        k_cache, v_cache = torch.zeros(4 * rows, HKV, D, dtype=torch.bfloat16), torch.zeros(4 * rows, HKV, D, dtype=torch.bfloat16)
        slots = torch.randperm(4 * rows, generator=gen)[:rows]
        cases = {
            "rms_norm": lambda ops: ops.rms_norm(x, w, 1e-5),
            "add_rms_norm": lambda ops: ops.add_rms_norm(x.clone(), delta, w, 1e-5),
            "rotary": lambda ops: ops.rotary(q, k, cos, sin),
            "silu_and_mul": lambda ops: ops.silu_and_mul(gate_up),
            "write_kv": lambda ops: ops.write_kv(LayerKV(k_cache, v_cache), slots, k, v),
        }
        for name, case in cases.items():
            torch_ms = median_ms(lambda: case(TorchOps), repeats)
            c_ms = median_ms(lambda: case(CpuOps), repeats)
            print(f"  rows={rows:5d} {name:13s} torch {torch_ms:7.3f}  C {c_ms:7.3f}  speed-up {torch_ms / c_ms:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,256,512", help="prefill lengths for the attention")
    parser.add_argument("--rows", default="64,2048", help="rows (tokens) for the layer ops")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"kernels unavailable: {cpu_kernels.unavailable_reason()}")
    print(f"threads={torch.get_num_threads()}")
    attention_rows([int(n) for n in args.lengths.split(",")], args.repeats)
    layer_op_rows([int(n) for n in args.rows.split(",")], args.repeats)


if __name__ == "__main__":
    main()
