"""Decode matmuls of SmolLM2-135M, bf16 against W8A8, each layer timed alone.

For every linear layer of the model (q/k/v, o_proj, gate/up, down, lm_head) at a decode batch
of B rows: the bf16 layer lightserve serves today (`Linear`, oneDNN-prepacked weight), the W8A8
layer (`Int8Linear`: quantize the activations, int8 product, dequantize), and the int8 product
alone (`torch._int_mm`), medians over repeats, with the ratios and the rate in GOP/s.

    python benchmarks/w8a8_matmul.py --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightserve.backend.models.linear import Int8Linear, Linear, int_mm
from lightserve.benchmark.report import cpu_name

# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536, vocabulary 49152.
LAYERS = {
    "qkv": (576, 576 + 2 * 192),
    "o_proj": (576, 576),
    "gate_up": (576, 2 * 1536),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}
PER_MODEL = {"qkv": 30, "o_proj": 30, "gate_up": 30, "down": 30, "lm_head": 1}  # calls per decode step




def median_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}")
    print(f"{'layer':8s} {'K x N':>12s} {'bf16 ms':>8s} {'w8a8 ms':>8s} {'int8 mm':>8s} {'w8a8 x':>7s} {'mm x':>6s}"
          f" {'bf16 GF/s':>9s} {'mm GOP/s':>9s}")
    gen = torch.Generator().manual_seed(0)
    totals = {"bf16": 0.0, "w8a8": 0.0, "mm": 0.0}
    for name, (k, n) in LAYERS.items():
        weight = torch.randn(n, k, generator=gen) / k**0.5
        x = torch.randn(args.batch, k, generator=gen).to(torch.bfloat16)
        dense = Linear(weight.to(torch.bfloat16).contiguous())
        quantized = Int8Linear(weight, None, torch.bfloat16, torch.device("cpu"))
        xq, _ = quantized._quantize(x)
        bf16_ms = median_ms(lambda: dense(x), args.repeats)
        w8a8_ms = median_ms(lambda: quantized(x), args.repeats)
        mm_ms = median_ms(lambda: int_mm(xq, quantized.qweight), args.repeats)
        ops = 2 * args.batch * k * n
        for key, ms in (("bf16", bf16_ms), ("w8a8", w8a8_ms), ("mm", mm_ms)):
            totals[key] += ms * PER_MODEL[name]
        print(f"{name:8s} {f'{k} x {n}':>12s} {bf16_ms:8.3f} {w8a8_ms:8.3f} {mm_ms:8.3f} {bf16_ms / w8a8_ms:6.2f}x"
              f" {bf16_ms / mm_ms:5.2f}x {ops / bf16_ms / 1e6:9.0f} {ops / mm_ms / 1e6:9.0f}")
    print(f"one decode step's linears (30 layers + lm_head): bf16 {totals['bf16']:.1f} ms, w8a8 {totals['w8a8']:.1f} ms "
          f"({totals['bf16'] / totals['w8a8']:.2f}x), int8 products alone {totals['mm']:.1f} ms "
          f"({totals['bf16'] / totals['mm']:.2f}x)")


if __name__ == "__main__":
    main()
