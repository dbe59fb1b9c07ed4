"""Console tables and the JSON result file."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from lightserve.benchmark.hf_baseline import HFResult
from lightserve.benchmark.stats import RunSummary
from lightserve.benchmark.workload import Conversation, WorkloadShape


def cpu_name() -> str:
    """The CPU's model name, to print beside every figure (timings mean little without it)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def workload_summary(conversations: Sequence[Conversation], shape: WorkloadShape) -> dict[str, Any]:
    """The workload as planned: its shape (so a run says what it measured) and its lengths. A
    multi-turn workload's later prompts depend on the server's answers, so only its first turns'
    prompt lengths are known here; the runs report the prompt tokens actually sent."""
    firsts = [c.first.prompt_len for c in conversations]
    outputs = [n for c in conversations for n in c.output_lens]
    summary: dict[str, Any] = {"num_requests": len(outputs), **asdict(shape)}
    if shape.turns > 1:
        summary.update(conversations=len(conversations), first_turn_prompt_len=_spread(firsts))
    else:
        summary.update(prompt_len=_spread(firsts), total_prompt_tokens=sum(firsts))
    summary.update(output_len=_spread(outputs), total_output_tokens=sum(outputs))
    return summary


def _spread(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}


def format_workload(w: dict[str, Any], seed: int) -> str:
    if w["multi_turn"] > 1:
        head = f"{w['num_requests']} requests in {w['conversations']} conversations of {w['multi_turn']} turns"
        prompts = f"first-turn prompt tokens {w['first_turn_prompt_len']['min']}-{w['first_turn_prompt_len']['max']}"
    else:
        head = f"{w['num_requests']} requests"
        prompts = (f"prompt tokens {w['prompt_len']['min']}-{w['prompt_len']['max']} "
                   f"(total {w['total_prompt_tokens']})")
    prefix = (f", shared prefix of {w['shared_prefix_len']} tokens in {w['shared_prefix_groups']} groups"
              if w["shared_prefix_len"] else "")
    return (f"workload: {head}{prefix}, {prompts}, output tokens {w['output_len']['min']}-{w['output_len']['max']} "
            f"(total {w['total_output_tokens']}), seed {seed}")


def format_run(s: RunSummary, server: str = "lightserve") -> str:
    conc = s.max_concurrency if s.max_concurrency else "unlimited"
    lines = [
        f"== {server}: request rate {rate_label(s.request_rate)} req/s, max concurrency {conc} ==",
        f"  completed / failed          {s.completed} / {s.failed}",
        f"  duration                    {s.duration_s:.2f} s",
        f"  client CPU                  {s.client_cpu_s:.2f} s ({100 * s.client_cpu_s / s.duration_s:.0f}% of one core)",
        f"  input / output tokens       {s.total_input_tokens} / {s.total_output_tokens}",
        f"  request throughput          {s.request_throughput:.3f} req/s",
        f"  output token throughput     {s.output_throughput:.1f} tok/s",
        f"  total token throughput      {s.total_token_throughput:.1f} tok/s",
        f"  {'(ms)':26s}{'mean':>10s}{'p50':>10s}{'p99':>10s}",
    ]
    for name, d in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E latency", s.e2e_ms)):
        lines.append(f"  {name:26s}{d.mean:10.1f}{d.p50:10.1f}{d.p99:10.1f}")
    if s.prompt_len_mismatches or s.output_len_mismatches:
        lines.append(f"  length mismatches: prompt {s.prompt_len_mismatches}, output {s.output_len_mismatches}")
    for error in s.errors:
        lines.append(f"  error: {error}")
    return "\n".join(lines)


def format_hf(hf: HFResult) -> str:
    lines = [
        f"== transformers ({hf.dtype}, static batches of {hf.batch_size}, FIFO, padded, greedy) ==",
        f"  requests run                {hf.requests_run} of {hf.requests_total} in {hf.batches} batches",
        f"  duration                    {hf.duration_s:.2f} s",
        f"  useful / computed tokens    {hf.useful_output_tokens} / {hf.generated_tokens}",
        f"  useful output throughput    {hf.useful_output_throughput:.1f} tok/s",
    ]
    if hf.subset:
        lines.append(f"  note: measured on the first {hf.requests_run} requests only; the rate is extrapolated to the "
                     f"workload (whole run would take ~{_extrapolated_s(hf):.0f} s)")
    return "\n".join(lines)


def _extrapolated_s(hf: HFResult) -> float:
    # Same useful-token rate over the whole workload's requested tokens (estimated from the subset's mean).
    return hf.useful_output_tokens / hf.requests_run * hf.requests_total / hf.useful_output_throughput


def format_comparison(runs: list[RunSummary], hf: HFResult) -> str:
    head = "== lightserve vs transformers (output tok/s; transformers: useful tokens"
    head += f", first {hf.requests_run} requests)" if hf.subset else ")"
    lines = [head, f"  {'rate':>8s}{'lightserve':>14s}{'transformers':>14s}{'ratio':>9s}"]
    for s in runs:
        lines.append(f"  {rate_label(s.request_rate):>8s}{s.output_throughput:14.1f}{hf.useful_output_throughput:14.1f}"
                     f"{ratio(s, hf):8.2f}x")
    return "\n".join(lines)


def ratio(run: RunSummary, hf: HFResult) -> float:
    return run.output_throughput / hf.useful_output_throughput


def write_json(path: str | Path, config: dict[str, Any], workload: dict[str, Any], runs: list[RunSummary],
               hf: Optional[HFResult]) -> None:
    """`workload` is `workload_summary`'s."""
    data = {
        "config": config,
        "workload": workload,
        "runs": [s.to_json() for s in runs],
        "hf_baseline": hf.to_json() if hf else None,
        "ratio_vs_transformers": {rate_label(s.request_rate): ratio(s, hf) for s in runs} if hf else None,
    }
    if hf and hf.subset:
        data["hf_baseline"]["estimated_full_duration_s"] = _extrapolated_s(hf)
    # NaN (e.g. no TPOT when every output is one token) is written as null: strict JSON has no NaN.
    Path(path).write_text(json.dumps(_nan_to_none(data), indent=2) + "\n")


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
