"""Driving a `ModelEngine` step by step in tests, the way the router does with StepPlans."""

from __future__ import annotations

from typing import Optional

import torch

from lightserve.backend.engine import ModelEngine
from lightserve.io_struct import Chunk, GenerateReq, SamplingParams, StepPlan, TokenOut


def prefill(engine: ModelEngine, reqs: list[GenerateReq], chunk: Optional[int] = None,
            decode: bool = False, cached: Optional[list[int]] = None) -> tuple[dict[int, torch.Tensor], list[TokenOut]]:
    """Admit `reqs` and compute their prompts, `chunk` tokens per request per step (None: whole
    prompts in one step), beside the decode rows when `decode`; `reqs[i]` starts with its first
    `cached[i]` tokens from the prefix cache (None: no hits). Returns each new request's
    last-position logits and every output sampled on the way (decode rows included)."""
    cached = cached or [0] * len(reqs)
    refused = engine.admit(reqs, cached)
    assert not refused, refused
    left = {r.req_id: len(r.prompt_ids) + len(r.output_ids) - n for r, n in zip(reqs, cached)}
    logits_of: dict[int, torch.Tensor] = {}
    outs: list[TokenOut] = []
    while left:
        chunks = [Chunk(req_id, min(n, chunk or n)) for req_id, n in left.items()]
        logits = engine.forward(StepPlan(chunks=chunks, decode=decode))
        for row, req_id in enumerate(engine.sampling_req_ids):
            if req_id in left:
                logits_of[req_id] = logits[row]
        outs += engine.sample(logits)
        for c in chunks:
            left[c.req_id] -= c.num_tokens
            if not left[c.req_id]:
                del left[c.req_id]
    return logits_of, outs


def decode(engine: ModelEngine) -> list[TokenOut]:
    """One decode step of every decoding request."""
    return engine.step(StepPlan(decode=True)).outs


def run_to_end(engine: ModelEngine) -> list[TokenOut]:
    """Decode until every request has finished."""
    outs: list[TokenOut] = []
    while engine.num_running:
        outs += decode(engine)
    return outs


def assert_kv_whole(engine: ModelEngine, flush: bool = True) -> None:
    """No request holds KV: every slot is free or an unlocked prefix-cache entry, and after a
    flush (`flush`) every slot is free again."""
    cache = engine.prefix_cache
    assert engine.num_running == 0
    assert cache.protected_tokens == 0, "a lock outlived its request"
    assert engine.mem.can_use_mem_size + cache.evictable_tokens == engine.mem.size
    if flush:
        engine.step(StepPlan(flush=True))
        assert engine.mem.can_use_mem_size == engine.mem.size and cache.total_tokens == 0


def greedy_with_late_joiners(engine: ModelEngine, prompts: list[list[int]], new_tokens: int,
                             decode_steps: int = 2) -> tuple[dict[int, list[int]], list[torch.Tensor]]:
    """Greedy tokens per request and the logits of every step: the first half of the requests
    prefill whole and decode `decode_steps` steps, then the others join with their prompts in
    chunks of 16 beside the decode rows (a chunk attends to the earlier ones through the token
    table), and all decode to the end."""
    reqs = [GenerateReq(req_id=i, prompt_ids=p, sampling=SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
            for i, p in enumerate(prompts)]
    tokens: dict[int, list[int]] = {r.req_id: [] for r in reqs}
    logits: list[torch.Tensor] = []

    def step(plan: StepPlan) -> None:
        logits.append(engine.forward(plan))
        for out in engine.sample(logits[-1]):
            tokens[out.req_id].append(out.token_id)

    half = len(reqs) // 2
    assert not engine.admit(reqs[:half])
    step(StepPlan(chunks=[Chunk(r.req_id, len(r.prompt_ids)) for r in reqs[:half]]))
    for _ in range(decode_steps):
        step(StepPlan(decode=True))
    assert not engine.admit(reqs[half:])
    left = {r.req_id: len(r.prompt_ids) for r in reqs[half:]}
    while left:
        chunks = [Chunk(req_id, min(n, 16)) for req_id, n in left.items()]
        step(StepPlan(chunks=chunks, decode=True))
        left = {c.req_id: left[c.req_id] - c.num_tokens for c in chunks if left[c.req_id] > c.num_tokens}
    while engine.num_running:
        step(StepPlan(decode=True))
    return tokens, logits
