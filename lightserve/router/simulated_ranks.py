"""A stand-in for the backend ranks that hands out KV slot numbers instead of running a model.

It lets the real `Scheduler` and `ReqQueue` be replayed on large synthetic workloads in
milliseconds (`benchmarks/router_sim.py`, the scheduler's property tests): it executes each
`StepPlan` the way a rank does — flush, release, admit with the plan's cache hits, evict, one slot
per computed token, a sampled token when a prompt completes and for every decode row — with the
same `PrefixCache` a rank runs, over real slot numbers, and raises `PoolExhausted` the moment a
step would need more slots than are free. Each request ends after the number of tokens
`output_len(req_id)` says (its EOS), or at max_new_tokens. Every sampled token is id 0.

`check_ownership` verifies what a rank cannot afford to check every step: every slot is free,
the cache's, or one request's, and never two of these.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

from lightserve.io_struct import FinishReason, StepPlan, StepResult, TokenOut
from lightserve.prefix_cache.cache import NO_HOLD, Hold, PrefixCache, cache_key, request_key


class PoolExhausted(RuntimeError):
    pass


def _concat(pieces: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(pieces))


@dataclass
class _Req:
    key: list  # prompt (and output before a pause) cache key, then the tokens generated here
    todo: int  # prompt (and recomputed output) tokens not yet computed
    generated: int
    max_new: int
    slots: list[int] = field(default_factory=list)  # one per computed token
    hold: Hold = NO_HOLD
    decoding: bool = False


class SimulatedRanks:
    def __init__(self, pool: int, output_len: Callable[[int], int], prefix_cache: bool = True):
        self.pool = pool
        self.output_len = output_len
        self.cache: PrefixCache[list[int]] = PrefixCache(prefix_cache, _concat)
        self.free: list[int] = list(range(pool - 1, -1, -1))  # popped from the end: lowest first
        self.reqs: dict[int, _Req] = {}
        self.peak_used = 0
        self.step_tokens: list[int] = []  # tokens computed by each step
        self.decode_rows: list[int] = []  # decode rows of each step
        self.released_running = 0  # releases of requests still held (aborts and pauses)
        self.hit_tokens = 0  # tokens taken from the cache at admission

    @property
    def used(self) -> int:
        """Slots not free: the requests' own and the cache's (evictable ones included)."""
        return self.pool - len(self.free)

    def step(self, plan: StepPlan) -> StepResult:
        if plan.flush:
            self._free_all(self.cache.flush())
        for req_id in plan.release:
            if (r := self.reqs.pop(req_id, None)) is not None:
                self.released_running += 1
                self._leave(r)
        for g, cached in itertools.zip_longest(plan.new_reqs, plan.cached, fillvalue=0):
            assert g.req_id not in self.reqs, f"request {g.req_id} admitted twice"
            key = request_key(g)
            hold, slots = self.cache.lock(key, cached)
            assert hold.length == cached, f"request {g.req_id}: the router expected {cached} cached, found {hold.length}"
            self.hit_tokens += cached
            self.reqs[g.req_id] = _Req(cache_key(g.prompt_ids, g.images, g.output_ids), len(key) - cached,
                                       len(g.output_ids), g.sampling.max_new_tokens, list(slots or []), hold)
        self._free_all(self.cache.evict(plan.evict))
        sampling = [req_id for req_id, r in self.reqs.items() if r.decoding] if plan.decode else []
        decode_rows = len(sampling)
        for req_id in sampling:
            self.reqs[req_id].slots += self._alloc(1)
        for c in plan.chunks:
            r = self.reqs[c.req_id]
            if not 0 < c.num_tokens <= r.todo or r.decoding:
                raise ValueError(f"request {c.req_id}: chunk of {c.num_tokens} with {r.todo} tokens to compute")
            r.slots += self._alloc(c.num_tokens)
            r.todo -= c.num_tokens
        self.step_tokens.append(decode_rows + sum(c.num_tokens for c in plan.chunks))
        self.decode_rows.append(decode_rows)
        self.peak_used = max(self.peak_used, self.used)
        for c in plan.chunks:
            r = self.reqs[c.req_id]
            done = self.cache.commit(r.key[: len(r.slots)], list(r.slots), r.hold)
            r.hold = done.hold
            if done.duplicates is not None:
                r.slots[done.start : done.end] = done.tree_slots
                self._free_all([done.duplicates])
            if r.todo == 0:
                sampling.append(c.req_id)
        outs = []
        for req_id in sampling:
            r = self.reqs[req_id]
            r.decoding = True
            r.generated += 1
            r.key.append(0)
            reason: Optional[FinishReason] = None
            if r.generated >= self.output_len(req_id):
                reason = FinishReason.EOS
            elif r.generated >= r.max_new:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._leave(self.reqs.pop(req_id))
            outs.append(TokenOut(req_id, 0, 0.0, reason))
        return StepResult(outs, self.pool, len(self.free), self.cache.total_tokens, self.cache.evictable_tokens,
                          len(self.reqs))

    def check_ownership(self) -> None:
        """Every slot is exactly one of: free, the cache's, one running request's own."""
        owners = [self.free, *(pieces for pieces in self._cached_slots())]
        owners += [r.slots[r.hold.length :] for r in self.reqs.values()]
        every = [s for group in owners for s in group]
        assert len(every) == len(set(every)) == self.pool, "a slot is owned twice or leaked"
        for r in self.reqs.values():  # a request's shared slots are the cache's own
            assert len(r.slots) >= r.hold.length

    def _cached_slots(self) -> list[list[int]]:
        stack, out = [self.cache.tree.root], []
        while stack:
            node = stack.pop()
            out.append(list(node.value))
            stack.extend(node.children.values())
        return out

    def _leave(self, r: _Req) -> None:
        freed = self.cache.release(r.key[: len(r.slots)], list(r.slots), r.hold)
        if freed is not None:
            self._free_all([freed])

    def _alloc(self, n: int) -> list[int]:
        if n > len(self.free):
            self.reqs.clear()  # as a rank does when a step fails
            raise PoolExhausted(f"a step needed {n} more KV slots, {len(self.free)} free of {self.pool}")
        taken = self.free[-n:]
        del self.free[-n:]
        return taken

    def _free_all(self, pieces: list[list[int]]) -> None:
        for piece in pieces:
            self.free.extend(piece)
