"""Offline throughput of the engine beside transformers, same model, same machine, same run.

For each dtype and batch size: prompts of random lengths (default 128-256 tokens) are
prefilled, then the batch decodes `--steps` tokens (contexts grow to ~384). Reported:
prefill tok/s and steady-state decode tok/s (median step) for lightserve, and transformers'
static-batch `generate` on the same prompts (left-padded) for the same number of tokens, with
the ratio. At --breakdown-batch the decode step is split into matmuls timed alone (the
roofline of this machine), attention, and everything else.

    python benchmarks/offline_throughput.py                     # SmolLM2, bf16+fp32, B=1,8,64,256
    python benchmarks/offline_throughput.py --dtypes bfloat16 --batches 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import transformers

from lightserve.backend.engine import ModelEngine
from lightserve.io_struct import GenerateReq, SamplingParams, StepPlan
from lightserve.server_args import ServerArgs


@dataclass
class Row:
    dtype: str
    batch: int
    ls_prefill: float
    ls_decode: float
    hf_prefill: float
    hf_decode: float

    def line(self) -> str:
        return (f"{self.dtype:9s} {self.batch:5d} | {self.ls_prefill:9.0f} {self.hf_prefill:9.0f} "
                f"{self.ls_prefill / self.hf_prefill:5.2f}x | {self.ls_decode:9.1f} {self.hf_decode:9.1f} "
                f"{self.ls_decode / self.hf_decode:5.2f}x")


def make_prompts(batch: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
    return [torch.randint(100, vocab, (n,), generator=g).tolist() for n in lens]


def bench_engine(engine: ModelEngine, prompts: list[list[int]], steps: int) -> tuple[float, float, list[float]]:
    sp = SamplingParams(max_new_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    reqs = [GenerateReq(req_id=i, prompt_ids=p, sampling=sp) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    engine.step(StepPlan.admit_whole(reqs))
    prefill_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step(StepPlan(decode=True))
        times.append(time.perf_counter() - t0)
    engine.release_all()
    step = statistics.median(times[2:] if len(times) > 4 else times)
    return sum(map(len, prompts)) / prefill_s, len(prompts) / step, times


class _StepClock(transformers.LogitsProcessor):
    """Stamps the time of every generation step: `generate` calls its logits processors once
    per step, right after the step's forward, so consecutive stamps are step times."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def bench_hf(model, prompts: list[list[int]], steps: int, pad_id: int) -> tuple[float, float]:
    """transformers' static-batch `generate`: (prefill tok/s, median-step decode tok/s)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as batched generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        model.generate(ids[:, -8:], max_new_tokens=2, attention_mask=mask[:, -8:].clamp(min=1), do_sample=False,
                       pad_token_id=pad_id)  # warm-up: first calls pay one-off set-up costs
        clock = _StepClock()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id, eos_token_id=None,
                       max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                       logits_processor=transformers.LogitsProcessorList([clock]))
    prefill_s = clock.stamps[0] - t0
    step_times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return sum(map(len, prompts)) / prefill_s, len(prompts) / statistics.median(step_times)


def time_op(fn, reps: int = 5) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def decode_breakdown(engine: ModelEngine, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """One decode step split into: its matmuls timed alone, its attention timed alone, the rest."""
    _, _, times = bench_engine(engine, prompts, steps)
    step_s = statistics.median(times[2:])
    model, batch = engine.model, len(prompts)
    x = torch.randn(batch, engine.cfg.hidden_size, dtype=engine.dtype)
    layer = model.layers[0].w
    h = torch.randn(batch, layer.down.in_features, dtype=engine.dtype)
    o = torch.randn(batch, layer.o_proj.in_features, dtype=engine.dtype)

    def matmuls():
        for lw in (l.w for l in model.layers):
            lw.qkv(x)
            lw.o_proj(o)
            lw.gate_up(x)
            lw.down(h)
        model.lm_head(x)

    matmul_s = time_op(matmuls)
    # Attention alone: the same batch at its mid-run context lengths, every layer.
    sp = SamplingParams(max_new_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    engine.step(StepPlan.admit_whole([GenerateReq(req_id=i, prompt_ids=p, sampling=sp) for i, p in enumerate(prompts)]))
    for _ in range(steps // 2):
        engine.step(StepPlan(decode=True))
    b = engine.decoding
    from lightserve.backend.forward_state import ForwardState

    state = ForwardState(positions=b.b_seq_len.long() - 1, out_slots=torch.zeros(batch, dtype=torch.long),
                         b_req_idx=b.b_req_idx, b_seq_len=b.b_seq_len, req_to_token=engine.req_manager.req_to_token,
                         num_decode=batch, max_seq_len=int(b.b_seq_len.max()))
    heads = engine.cfg.num_heads
    q = torch.randn(batch, heads, engine.cfg.head_dim, dtype=engine.dtype)

    def attention():
        model.attention.begin_step(state)
        for kv in engine.kv_cache:
            model.attention.decode(q, kv, state)

    attn_s = time_op(attention)
    engine.release_all()
    return {"step_ms": step_s * 1e3, "matmul_ms": matmul_s * 1e3, "attention_ms": attn_s * 1e3,
            "other_ms": (step_s - matmul_s - attn_s) * 1e3, "step_over_matmul": step_s / matmul_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--prompt_min", type=int, default=128)
    ap.add_argument("--prompt_max", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--attention_backend", default="auto")
    ap.add_argument("--breakdown_batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.model_dir is None:
        from lightserve.utils.embedded_model import embedded_model_dir

        a.model_dir = str(embedded_model_dir())
    batches = [int(b) for b in a.batches.split(",")]
    max_batch = max(batches)
    rows, breakdowns = [], {}
    print(f"{'dtype':9s} {'batch':>5s} | {'prefill tok/s: lightserve':>9s} {'hf':>9s} ratio | "
          f"{'decode tok/s: lightserve':>9s} {'hf':>9s} ratio")
    for dtype in a.dtypes.split(","):
        args = ServerArgs(device="cpu", data_type=dtype, attention_backend=a.attention_backend,
                          max_total_token_num=max_batch * (a.prompt_max + a.steps + 8),
                          max_req_total_len=a.prompt_max + a.steps + 8, running_max_req_size=max_batch)
        engine = ModelEngine(args, a.model_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, dtype)).eval()
        for batch in batches:
            prompts = make_prompts(batch, a.prompt_min, a.prompt_max, engine.cfg.vocab_size, seed=batch)
            ls_pre, ls_dec, _ = bench_engine(engine, prompts, a.steps)
            hf_pre, hf_dec = bench_hf(hf, prompts, a.steps, pad_id=0)
            row = Row(dtype, batch, ls_pre, ls_dec, hf_pre, hf_dec)
            rows.append(row)
            print(row.line(), flush=True)
            if batch == a.breakdown_batch:
                breakdowns[dtype] = decode_breakdown(engine, prompts, a.steps)
        del engine, hf
    print(f"\nattention back end: {a.attention_backend}; threads: {a.threads}")
    for dtype, bd in breakdowns.items():
        print(f"decode step at B={a.breakdown_batch} {dtype}: {bd['step_ms']:.1f} ms = matmuls {bd['matmul_ms']:.1f} "
              f"+ attention {bd['attention_ms']:.1f} + other {bd['other_ms']:.1f}; step / matmuls = {bd['step_over_matmul']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": [r.__dict__ for r in rows], "breakdown": breakdowns, "args": vars(a)}, f, indent=1)


if __name__ == "__main__":
    main()
