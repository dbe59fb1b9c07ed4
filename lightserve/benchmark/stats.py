"""Serving metrics from the client's timestamps.

Definitions (the usual ones of serving benchmarks):
- TTFT: first token event received - request sent.
- ITL: gap between two consecutive token events of one request; all gaps of all requests pooled.
- TPOT: per request, (last token - first token) / (tokens - 1): the mean decode time per output
  token after the first; requests with a single token have none.
- E2E latency: last event received - request sent.
- Throughputs divide by the wall time from the first request sent to the last response ended.
Only successful requests count toward tokens and latencies; failures are counted separately.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from lightserve.benchmark.client import LoadResult, RequestRecord


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between ranks; nan when empty."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else math.nan


@dataclass
class Distribution:
    """Mean / median / p99 / max of a latency, in milliseconds."""

    mean: float
    p50: float
    p99: float
    count: int
    max: float = math.nan

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> "Distribution":
        ms = [v * 1000.0 for v in values]
        mean = float(np.mean(ms)) if ms else math.nan
        return cls(mean, percentile(ms, 50), percentile(ms, 99), len(ms), max(ms) if ms else math.nan)


def ttft(record: RequestRecord) -> Optional[float]:
    return record.token_times[0] - record.start if record.token_times else None


def inter_token_latencies(record: RequestRecord) -> list[float]:
    times = record.token_times
    return [b - a for a, b in zip(times, times[1:])]


def tpot(record: RequestRecord) -> Optional[float]:
    times, n = record.token_times, record.generated
    return (times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else None


def e2e_latency(record: RequestRecord) -> float:
    return record.end - record.start


@dataclass
class RunSummary:
    """Everything reported for one request rate."""

    request_rate: float
    max_concurrency: Optional[int]
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output tokens) / s
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    # Requests whose prompt length on the server (details.input_length) or output length differs
    # from the workload's: should be 0 (with ignore_eos for outputs), else the workload is not what it says.
    prompt_len_mismatches: int
    output_len_mismatches: int
    errors: list[str]
    client_cpu_s: float = 0.0  # the benchmark client's own CPU time during the run

    def to_json(self) -> dict:
        data = asdict(self)
        data["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return data


def summarize(result: LoadResult) -> RunSummary:
    ok = [r for r in result.records if r.ok]
    failed = [r for r in result.records if not r.ok]
    duration = result.duration
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.generated for r in ok)
    return RunSummary(
        request_rate=result.request_rate,
        max_concurrency=result.max_concurrency,
        num_requests=len(result.records),
        completed=len(ok),
        failed=len(failed),
        duration_s=duration,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        ttft_ms=Distribution.of_seconds([t for t in map(ttft, ok) if t is not None]),  # none without streaming
        tpot_ms=Distribution.of_seconds([t for t in map(tpot, ok) if t is not None]),
        itl_ms=Distribution.of_seconds([gap for r in ok for gap in inter_token_latencies(r)]),
        e2e_ms=Distribution.of_seconds([e2e_latency(r) for r in ok]),
        prompt_len_mismatches=sum(r.server_prompt_len is not None and r.server_prompt_len != r.prompt_len for r in ok),
        output_len_mismatches=sum(r.generated != r.output_len for r in ok),
        errors=sorted({r.error for r in failed if r.error})[:10],
        client_cpu_s=result.client_cpu_s,
    )
