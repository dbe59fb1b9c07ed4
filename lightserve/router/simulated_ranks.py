"""A stand-in for the backend ranks that counts KV slots instead of running a model.

It lets the real `Scheduler` and `ReqQueue` be replayed on large synthetic workloads in
milliseconds (`benchmarks/router_sim.py`, the scheduler's property tests): it executes each
`StepPlan` the way a rank does — release, admit, one slot per computed token, a sampled token
when a prompt completes and for every decode row — and raises `PoolExhausted` the moment a step
would need more slots than the pool has. Each request ends after the number of tokens
`output_len(req_id)` says (its EOS), or at max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from lightserve.io_struct import FinishReason, StepPlan, StepResult, TokenOut


class PoolExhausted(RuntimeError):
    pass


@dataclass
class _Req:
    todo: int  # prompt (and recomputed output) tokens not yet computed
    generated: int
    max_new: int
    held: int = 0
    decoding: bool = False


class SimulatedRanks:
    def __init__(self, pool: int, output_len: Callable[[int], int]):
        self.pool = pool
        self.output_len = output_len
        self.reqs: dict[int, _Req] = {}
        self.peak_used = 0
        self.step_tokens: list[int] = []  # tokens computed by each step
        self.decode_rows: list[int] = []  # decode rows of each step
        self.released_running = 0  # releases of requests still held (aborts and pauses)

    @property
    def used(self) -> int:
        return sum(r.held for r in self.reqs.values())

    def step(self, plan: StepPlan) -> StepResult:
        for req_id in plan.release:
            self.released_running += self.reqs.pop(req_id, None) is not None
        for g in plan.new_reqs:
            assert g.req_id not in self.reqs, f"request {g.req_id} admitted twice"
            self.reqs[g.req_id] = _Req(len(g.prompt_ids) + len(g.output_ids), len(g.output_ids),
                                       g.sampling.max_new_tokens)
        sampling = [req_id for req_id, r in self.reqs.items() if r.decoding] if plan.decode else []
        decode_rows = len(sampling)
        for req_id in sampling:
            self.reqs[req_id].held += 1
        for c in plan.chunks:
            r = self.reqs[c.req_id]
            if not 0 < c.num_tokens <= r.todo or r.decoding:
                raise ValueError(f"request {c.req_id}: chunk of {c.num_tokens} with {r.todo} tokens to compute")
            r.todo -= c.num_tokens
            r.held += c.num_tokens
            if r.todo == 0:
                sampling.append(c.req_id)
        self.step_tokens.append(decode_rows + sum(c.num_tokens for c in plan.chunks))
        self.decode_rows.append(decode_rows)
        used = self.used
        self.peak_used = max(self.peak_used, used)
        if used > self.pool:
            self.reqs.clear()  # as a rank does when a step fails
            raise PoolExhausted(f"a step needed {used} KV slots of {self.pool}")
        outs = []
        for req_id in sampling:
            r = self.reqs[req_id]
            r.decoding = True
            r.generated += 1
            reason: Optional[FinishReason] = None
            if r.generated >= self.output_len(req_id):
                reason = FinishReason.EOS
            elif r.generated >= r.max_new:
                reason = FinishReason.LENGTH
            if reason is not None:
                del self.reqs[req_id]
            outs.append(TokenOut(req_id, 0, 0.0, reason))
        return StepResult(outs, self.pool, self.pool - self.used, len(self.reqs))
