"""The HTTP load generator: sends the workload to `POST /generate_stream` (lightserve, TGI) or to
`POST /v1/completions` of any OpenAI-compatible server (`Api`), and timestamps every token.

Requests arrive as a Poisson process at `request_rate` (all at once when the rate is infinite),
optionally capped at `max_concurrency` requests in flight. A multi-turn workload is driven the same
way with conversations in place of requests: each conversation's turns are sent one after another,
the next as soon as the previous one has finished, its prompt carrying the previous answer (the
`generated_text` of the stream's final event). Each token event's arrival time is
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
from itertools import accumulate
from typing import Optional, Sequence, Union

import httpx
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from lightserve.benchmark.workload import BenchRequest, Conversation, FollowUp, next_turn_prompt, prompt_lengths


@dataclass
class RequestRecord:
    """What the client observed for one request (times from `time.perf_counter`, seconds)."""

    index: int
    prompt_len: int  # tokens incl. special ones; for a later turn of a conversation, counted after the run
    output_len: int  # requested max_new_tokens
    start: float = 0.0
    # One per token event, in order. An OpenAI stream may carry several tokens in one event (a
    # token whose text is held back rides with the next), so its count comes from `usage`.
    token_times: list[float] = field(default_factory=list)
    server_output_len: Optional[int] = None  # `usage.completion_tokens` of an OpenAI stream
    end: float = 0.0
    server_prompt_len: Optional[int] = None  # `details.input_length` of the last event
    finish_reason: Optional[str] = None
    generated_text: Optional[str] = None  # of the final event: the answer that the next turn's prompt carries
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None

    @property
    def generated(self) -> int:
        return self.server_output_len if self.server_output_len is not None else len(self.token_times)


@dataclass
class LoadResult:
    """One pass of the workload at one request rate."""

    request_rate: float
    max_concurrency: Optional[int]
    records: list[RequestRecord]
    start: float
    end: float
    # CPU seconds the client process itself used during the run: on a small machine shared with
    # the server, these are cycles the server did not get.
    client_cpu_s: float = 0.0

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


Prompt = Union[str, list[int]]


@dataclass(frozen=True)
class Api:
    """The HTTP API the load goes to. `tgi`: lightserve's `/generate_stream`, text prompts. `openai`:
    `/v1/completions` streaming with token-id prompts where the workload has them (first turns), so
    every server sees the same prompt tokens; vLLM and llama.cpp's server take them, and
    `ignore_eos`, as lightserve does."""

    kind: str = "tgi"  # "tgi" | "openai"
    model: str = ""  # the OpenAI `model` field
    # False: one answer per request, no events (pure throughput; no TTFT or inter-token times).
    stream: bool = True

    @property
    def path(self) -> str:
        if self.kind == "tgi":
            return "/generate_stream" if self.stream else "/generate"
        return "/v1/completions"

    def prompt(self, req: BenchRequest) -> Prompt:
        return list(req.prompt_ids) if self.kind == "openai" else req.prompt

    def body(self, prompt: Prompt, output_len: int, ignore_eos: bool) -> dict:
        """Greedy decoding, as the transformers baseline does; `ignore_eos` pins the output length."""
        if self.kind == "tgi":
            parameters = {"max_new_tokens": output_len, "ignore_eos": ignore_eos, "do_sample": False}
            return {"inputs": prompt, "parameters": parameters if self.stream else {**parameters, "details": True}}
        body = {"model": self.model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                "ignore_eos": ignore_eos, "stream": self.stream}
        return {**body, "stream_options": {"include_usage": True}} if self.stream else body

    def read_answer(self, answer: dict, record: RequestRecord) -> None:
        """Fold a whole (not streamed) answer into `record`: its lengths, end and text."""
        if self.kind == "tgi":
            details = answer.get("details") or {}
            record.finish_reason = details.get("finish_reason")
            record.server_prompt_len = details.get("prompt_tokens")
            record.server_output_len = details.get("generated_tokens")
            record.generated_text = answer.get("generated_text")
        else:
            choice, usage = answer["choices"][0], answer.get("usage") or {}
            record.finish_reason = choice.get("finish_reason")
            record.generated_text = choice.get("text")
            record.server_prompt_len = usage.get("prompt_tokens")
            record.server_output_len = usage.get("completion_tokens")

    def read(self, event: dict, record: RequestRecord, now: float) -> None:
        """Fold one `data:` event into `record`: a token's timestamp, the end, or an error."""
        if "error" in event:
            error = event["error"]
            record.error = (f"{event.get('error_type', 'error')}: {error}" if isinstance(error, str)
                            else f"{error.get('type', 'error')}: {error.get('message')}")
        elif self.kind == "tgi":
            record.token_times.append(now)
            if details := event.get("details"):
                record.finish_reason = details.get("finish_reason")
                record.server_prompt_len = details.get("input_length")
                record.generated_text = event.get("generated_text")
        else:
            if event.get("choices"):  # one token per event (lightserve, vLLM)
                choice = event["choices"][0]
                record.token_times.append(now)
                record.generated_text = (record.generated_text or "") + choice.get("text", "")
                record.finish_reason = choice.get("finish_reason") or record.finish_reason
            # `usage` comes in an event of its own (OpenAI, lightserve, vLLM) or with the last
            # choice (llama.cpp's server, whose last event carries no token: the output length
            # comes from here, not from counting events).
            if usage := event.get("usage"):
                record.server_prompt_len = usage.get("prompt_tokens")
                record.server_output_len = usage.get("completion_tokens")


async def stream_one(client: httpx.AsyncClient, url: str, record: RequestRecord, prompt: Prompt,
                     ignore_eos: bool, api: Api = Api()) -> RequestRecord:
    """Send `prompt` as a streaming request for `record` (index and lengths set) and timestamp each
    `data:` event as it is read."""
    record.start = time.perf_counter()
    try:
        body = api.body(prompt, record.output_len, ignore_eos)
        if not api.stream:
            response = await client.post(url + api.path, json=body)
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.text[:200]}"
            else:
                api.read_answer(response.json(), record)
            return record
        async with client.stream("POST", url + api.path, json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                api.read(json.loads(line[5:]), record, time.perf_counter())
                if record.error is not None:
                    break
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.end = time.perf_counter()
    if record.error is None and record.finish_reason is None:
        record.error = "stream ended without a final event"
    return record


async def run_load(url: str, requests: Sequence[BenchRequest], request_rate: float, max_concurrency: Optional[int],
                   ignore_eos: bool = True, seed: int = 0, progress: bool = True, api: Api = Api()) -> LoadResult:
    """Drive a workload of independent requests once against the server at `url` and return what
    was observed."""
    return await run_conversations(url, [Conversation(r) for r in requests], None, request_rate, max_concurrency,
                                   ignore_eos, seed, progress, api)


async def run_conversations(url: str, conversations: Sequence[Conversation],
                            tokenizer: Optional[PreTrainedTokenizerBase], request_rate: float,
                            max_concurrency: Optional[int], ignore_eos: bool = True, seed: int = 0,
                            progress: bool = True, api: Api = Api()) -> LoadResult:
    """Drive a workload of conversations once; their first turns arrive as the requests of
    `run_load` do. A conversation holds its `max_concurrency` slot through all its turns, so the cap
    bounds the conversations in progress (whose prefixes a cache has to keep) as well as the
    requests in flight. Records are in workload order: conversation by conversation, turn by turn.
    `tokenizer` counts the prompt tokens of later turns (not needed for one-turn conversations)."""
    if tokenizer is None and any(c.follow_ups for c in conversations):
        raise ValueError("multi-turn conversations need the tokenizer to count their prompt tokens")
    offsets = arrival_offsets(len(conversations), request_rate, seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    total = sum(c.turns for c in conversations)
    bar = tqdm(total=total, desc=f"rate {request_rate:g} req/s", unit="req", disable=not progress)
    later_prompts: list[tuple[RequestRecord, str]] = []
    # No connection cap: the client must never queue requests itself, or TTFT would include
    # time spent waiting for a free connection in the client's pool. No kept-alive connections
    # either: a server may close an idle one just as the client sends the next request on it
    # (llama.cpp's server does after 5 s, and 13 of 128 requests failed with "Server
    # disconnected"); a new local connection per request costs well under a millisecond.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(None, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start, cpu_start = time.perf_counter(), time.process_time()

        async def one(number: int, first_index: int, conversation: Conversation) -> list[RequestRecord]:
            await asyncio.sleep(max(0.0, start + offsets[number] - time.perf_counter()))
            async with gate or nullcontext():
                return await converse(client, url, first_index, conversation, ignore_eos, later_prompts, bar, api)

        first_indices = accumulate((c.turns for c in conversations), initial=0)
        per_conversation = await asyncio.gather(*(one(n, i, c) for n, (i, c) in
                                                  enumerate(zip(first_indices, conversations))))
        end, cpu_end = time.perf_counter(), time.process_time()
    bar.close()
    # Counted after the run: encoding a long prompt takes milliseconds of the client's CPU, which
    # during the run would delay other streams' timestamps (and, on one machine, the server).
    if later_prompts:
        counts = prompt_lengths(tokenizer, [prompt for _, prompt in later_prompts])
        for (record, _), count in zip(later_prompts, counts):
            record.prompt_len = count
    return LoadResult(request_rate, max_concurrency, [r for records in per_conversation for r in records], start, end,
                      cpu_end - cpu_start)


async def converse(client: httpx.AsyncClient, url: str, first_index: int, conversation: Conversation,
                   ignore_eos: bool, later_prompts: list[tuple[RequestRecord, str]], bar: tqdm,
                   api: Api = Api()) -> list[RequestRecord]:
    """The turns of one conversation, each sent when the previous one has finished. Later turns'
    records go to `later_prompts` with their prompts, whose tokens are counted after the run. Once
    a turn fails, the following ones cannot be made (no answer) and are recorded as failed."""
    first = conversation.first
    prompt = first.prompt
    record = await stream_one(client, url, RequestRecord(first_index, first.prompt_len, first.output_len),
                              api.prompt(first), ignore_eos, api)
    records = [record]
    bar.update(1)
    for turn, follow_up in enumerate(conversation.follow_ups, 1):
        if not record.ok:
            records.append(_not_sent(first_index + turn, follow_up))
            bar.update(1)
            continue
        prompt = next_turn_prompt(prompt, record.generated_text or "", follow_up.user_message)
        record = RequestRecord(first_index + turn, 0, follow_up.output_len)
        later_prompts.append((record, prompt))
        records.append(await stream_one(client, url, record, prompt, ignore_eos, api))
        bar.update(1)
    return records


def _not_sent(index: int, follow_up: FollowUp) -> RequestRecord:
    now = time.perf_counter()
    return RequestRecord(index, 0, follow_up.output_len, start=now, end=now,
                         error="not sent: an earlier turn of its conversation failed")


async def warm_up(url: str, req: BenchRequest, ignore_eos: bool = True, api: Api = Api()) -> None:
    """One short request before measuring, so one-off costs (first kernel runs, allocator growth)
    are not charged to the first measured requests."""
    short = RequestRecord(-1, req.prompt_len, min(req.output_len, 4))
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0)) as client:
        record = await stream_one(client, url, short, api.prompt(req), ignore_eos, api)
    if not record.ok:
        raise RuntimeError(f"warm-up request failed: {record.error}")
