"""The HTTP load generator: sends the workload to `POST /generate_stream` and timestamps every token.

Requests arrive as a Poisson process at `request_rate` (all at once when the rate is infinite),
optionally capped at `max_concurrency` requests in flight. Each token event's arrival time is
recorded on the client side, which is what a user sees (network, HTTP and SSE framing included);
latency statistics are derived from these timestamps in `stats.py`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import httpx
from tqdm import tqdm

from lightserve.benchmark.workload import BenchRequest


@dataclass
class RequestRecord:
    """What the client observed for one request (times from `time.perf_counter`, seconds)."""

    index: int
    prompt_len: int
    output_len: int  # requested max_new_tokens
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)  # one per token event, in order
    end: float = 0.0
    server_prompt_len: Optional[int] = None  # `details.input_length` of the last event
    finish_reason: Optional[str] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def generated(self) -> int:
        return len(self.token_times)


@dataclass
class LoadResult:
    """One pass of the workload at one request rate."""

    request_rate: float
    max_concurrency: Optional[int]
    records: list[RequestRecord]
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each of `n` requests is sent: a Poisson process (exponential
    gaps with mean 1/rate, seeded), or all at 0 for an infinite rate."""
    if request_rate <= 0:
        raise ValueError("request rate must be > 0 (inf: all at once)")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets


def request_body(req: BenchRequest, ignore_eos: bool) -> dict:
    """Greedy decoding, as the transformers baseline does; `ignore_eos` pins the output length."""
    return {"inputs": req.prompt,
            "parameters": {"max_new_tokens": req.output_len, "ignore_eos": ignore_eos, "do_sample": False}}


async def stream_one(client: httpx.AsyncClient, url: str, index: int, req: BenchRequest,
                     ignore_eos: bool) -> RequestRecord:
    """Send one streaming request and timestamp each `data:` event as it is read."""
    record = RequestRecord(index=index, prompt_len=req.prompt_len, output_len=req.output_len)
    record.start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/generate_stream", json=request_body(req, ignore_eos)) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                event = json.loads(line[5:])
                if "error" in event:
                    record.error = f"{event.get('error_type', 'error')}: {event['error']}"
                    break
                record.token_times.append(now)
                details = event.get("details")
                if details:
                    record.finish_reason = details.get("finish_reason")
                    record.server_prompt_len = details.get("input_length")
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.end = time.perf_counter()
    if record.error is None and record.finish_reason is None:
        record.error = "stream ended without a final event"
    return record


async def run_load(url: str, requests: list[BenchRequest], request_rate: float, max_concurrency: Optional[int],
                   ignore_eos: bool = True, seed: int = 0, progress: bool = True) -> LoadResult:
    """Drive the whole workload once against the server at `url` and return what was observed."""
    offsets = arrival_offsets(len(requests), request_rate, seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc=f"rate {request_rate:g} req/s", unit="req", disable=not progress)
    # No connection cap: the client must never queue requests itself, or TTFT would include
    # time spent waiting for a free connection in the client's pool.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def one(index: int, req: BenchRequest) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offsets[index] - time.perf_counter()))
            async with gate or nullcontext():
                record = await stream_one(client, url, index, req, ignore_eos)
            bar.update(1)
            return record

        records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        end = time.perf_counter()
    bar.close()
    return LoadResult(request_rate, max_concurrency, list(records), start, end)


async def warm_up(url: str, req: BenchRequest, ignore_eos: bool = True) -> None:
    """One short request before measuring, so one-off costs (first kernel runs, allocator growth)
    are not charged to the first measured requests."""
    short = BenchRequest(req.prompt, req.prompt_ids, min(req.output_len, 4))
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0)) as client:
        record = await stream_one(client, url, -1, short, ignore_eos)
    if not record.ok:
        raise RuntimeError(f"warm-up request failed: {record.error}")
