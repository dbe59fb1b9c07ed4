"""The router's step: schedule tokens, run one step on every rank, account.

Shared by the router process (backend = the tensor-parallel ranks over rpyc) and the offline
`LLM` (backend = an in-process `ModelEngine`), so there is one scheduling policy.

Every running request carries `computed`, the number of its tokens (prompt, then output) whose
KV is in the pool. A step schedules tokens, not phases: each decoding request computes its last
sampled token, and requests still computing their prompt get chunks of it within the step's
token budget (`--chunked_prefill_size`); a chunk that reaches the end of the prompt samples the
request's first token. With a budget of 0 a step is either a whole-prompt prefill of newly
admitted requests or a decode step (the wave-1 behaviour).

The prefix cache. The scheduler runs the same `PrefixCache` as every rank, on the same calls in
the same order (see `prefix_cache.cache`), so it knows without asking what each rank's cache
holds: a new request found there starts with `computed` = its hit, and the step tells the ranks
how many unused cached tokens to evict for its tokens to fit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

from lightserve.io_struct import Chunk, GenerateReq, StepPlan, StepResult, TokenOut
from lightserve.prefix_cache.cache import NO_HOLD, Hold, PrefixCache, cache_key
from lightserve.router.req_queue import ReqQueue, RunningReqInfo
from lightserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Runs one StepPlan (`ModelEngine`, or every rank through rpyc)."""

    def step(self, plan: StepPlan) -> StepResult: ...


def _range_concat(pieces: list[range]) -> range:
    """The router's cache values: only their lengths matter (the ranks hold the slots)."""
    return range(sum(len(p) for p in pieces))


@dataclass
class RunningReq:
    req: GenerateReq
    output_ids: list[int] = field(default_factory=list)  # incl. tokens from before a pause
    computed: int = 0  # tokens whose KV is in the pool
    decoding: bool = False  # its prompt is in and it has sampled: one token per step from now on
    # Its lock on its first `hold.length` tokens in the prefix cache (shared, not its own).
    hold: Hold = NO_HOLD
    prompt_key: list[Hashable] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.req.prompt_ids) + len(self.output_ids)

    @property
    def uncomputed(self) -> int:
        return self.num_tokens - self.computed

    @property
    def owned(self) -> int:
        """KV slots it holds outside the prefix cache."""
        return self.computed - self.hold.length

    def key(self, n: int) -> list[Hashable]:
        """The cache key of its first `n` tokens (prompt, then output)."""
        return (self.prompt_key + self.output_ids)[:n]

    def info(self, in_lockstep: bool, locked_alone: int) -> RunningReqInfo:
        # Cached tokens it shares with other running requests count among the cache's protected
        # tokens instead; those only it locks (`locked_alone`) are as good as its own.
        return RunningReqInfo(
            req_id=self.req.req_id,
            held_tokens=self.num_tokens - self.hold.length + locked_alone,
            locked_alone=locked_alone,
            max_new_tokens=self.req.sampling.max_new_tokens,
            generated=len(self.output_ids),
            ignore_eos=self.req.sampling.ignore_eos,
            in_lockstep=in_lockstep,
        )

    def paused(self) -> GenerateReq:
        """The request to requeue: its output so far is recomputed with the prompt on resume."""
        r = self.req
        return GenerateReq(req_id=r.req_id, prompt_ids=r.prompt_ids, sampling=r.sampling, images=r.images,
                           arrival_time=r.arrival_time, output_ids=list(self.output_ids))


class Scheduler:
    def __init__(self, queue: ReqQueue, backend: Backend, max_total_token_num: int, chunked_prefill_size: int,
                 max_wait_steps: int, prefix_cache: bool = True):
        self.queue = queue
        self.backend = backend
        self.max_total_token_num = max_total_token_num
        self.chunked_prefill_size = chunked_prefill_size
        self.max_wait_steps = max_wait_steps
        self.cache: PrefixCache[range] = PrefixCache(prefix_cache, _range_concat)
        self.running: dict[int, RunningReq] = {}  # in admission order
        self._steps_since_admission = 0
        self._to_release: list[RunningReq] = []  # aborted or stopped since the last step
        self._flush_requested = False
        self._queue_times: list[float] = []
        # The pool as the ranks last reported it (rank 0), for /metrics and the stats log.
        self.kv_total = max_total_token_num
        self.kv_free = max_total_token_num
        self.kv_cached = 0  # of which the prefix cache holds
        self.kv_evictable = 0  # of which nobody running uses
        # Running totals for the stats log: prompt tokens computed (incl. recomputed after a
        # pause), tokens generated, steps run (one call per rank each), and the prompt tokens of
        # admitted requests looked up in the prefix cache and found there.
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.cache_queried_tokens = 0
        self.cache_hit_tokens = 0

    @classmethod
    def for_server(cls, args: ServerArgs, backend: Backend, max_total_token_num: int) -> "Scheduler":
        """The scheduler of a server's router or of the offline `LLM`, from the same settings."""
        return cls(ReqQueue.from_args(args, max_total_token_num), backend, max_total_token_num,
                   args.chunked_prefill_size, args.router_max_wait_tokens, not args.disable_prefix_cache)

    # ---- inputs ------------------------------------------------------------------------------
    def add(self, req: GenerateReq) -> None:
        self.queue.append(req)

    def abort(self, req_id: int) -> None:
        """Forget a request: dropped from the queue now, its KV released by the next step."""
        if not self.queue.abort(req_id) and (r := self.running.pop(req_id, None)) is not None:
            self._to_release.append(r)

    def flush_cache(self) -> None:
        """Drop every prefix-cache entry no running request uses, in the next step."""
        self._flush_requested = True

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.queue) > 0 or bool(self._to_release) or self._flush_requested

    def kv_used(self) -> int:
        """KV slots the running requests need kept: their own, and the cached ones they lock."""
        return sum(r.owned for r in self.running.values()) + self.cache.protected_tokens

    def take_queue_times(self) -> list[float]:
        """Queue waits of the requests admitted since the last call."""
        times, self._queue_times = self._queue_times, []
        return times

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[TokenOut]:
        plan = self.schedule()
        if plan.is_empty:
            return []
        result = self.backend.step(plan)
        self.steps += 1
        self._account(plan, result.outs)
        self.kv_total, self.kv_free = result.kv_total, result.kv_free
        self.kv_cached, self.kv_evictable = result.kv_cached, result.kv_evictable
        if result.kv_free != (expected := self.kv_free_expected()):
            logger.error("router: rank 0 reports %d free KV slots, the router's prefix cache expects %d",
                         result.kv_free, expected)
        return result.outs

    def kv_free_expected(self) -> int:
        """Free slots on every rank by the router's own count (cross-checked against rank 0 each step)."""
        return self.max_total_token_num - sum(r.owned for r in self.running.values()) - self.cache.total_tokens

    def schedule(self) -> StepPlan:
        """The next step's plan; the router's prefix cache follows it as the ranks will."""
        plan = StepPlan()
        if self._flush_requested:
            self._flush_requested, plan.flush = False, True
            self.cache.flush()
        for r in self._to_release:
            self._release(plan, r)
        self._to_release = []
        if self.chunked_prefill_size > 0:
            self._schedule_chunked(plan)
        else:
            self._schedule_whole(plan)
        step_tokens = sum(c.num_tokens for c in plan.chunks) + (self._num_decoding() if plan.decode else 0)
        plan.evict = max(0, step_tokens - self.kv_free_expected())
        self.cache.evict(plan.evict)
        return plan

    def _num_decoding(self) -> int:
        return sum(r.decoding for r in self.running.values())

    def _schedule_whole(self, plan: StepPlan) -> None:
        """Budget 0: admit and prefill whole prompts in a step of their own, else decode."""
        self._make_room(plan, need=len(self.running))
        waited = self._steps_since_admission >= self.max_wait_steps
        if len(self.queue) and (not self.running or waited):
            self._steps_since_admission = 0
            new = self.queue.generate_new_batch(self._infos(set()), cache=self.cache)
            if new:
                self._start(plan, new)
                plan.chunks = [Chunk(r.req_id, self.running[r.req_id].uncomputed) for r in new]
                return
        plan.decode = bool(self.running)
        self._steps_since_admission += 1

    def _schedule_chunked(self, plan: StepPlan) -> None:
        """Decode rows first, then prompt chunks in admission order, then new requests, within
        the step's token budget."""
        decoding = [r for r in self.running.values() if r.decoding]
        prefilling = [r for r in self.running.values() if not r.decoding]
        need = len(decoding) + min(sum(r.uncomputed for r in prefilling), self.chunked_prefill_size)
        self._make_room(plan, need)
        plan.decode = any(r.decoding for r in self.running.values())
        budget = self.chunked_prefill_size - sum(r.decoding for r in self.running.values())
        finishing: set[int] = set()  # requests whose prompt completes this step
        for r in self.running.values():
            if r.decoding or budget <= 0:
                continue
            n = min(r.uncomputed, budget)
            plan.chunks.append(Chunk(r.req.req_id, n))
            budget -= n
            if n == r.uncomputed:
                finishing.add(r.req.req_id)
        if budget > 0 and len(self.queue):
            new = self.queue.generate_new_batch(self._infos(finishing), prefill_budget=budget, cache=self.cache)
            self._start(plan, new)
            for r in new:
                n = min(self.running[r.req_id].uncomputed, budget)
                plan.chunks.append(Chunk(r.req_id, n))
                budget -= n

    def _infos(self, finishing: set[int]) -> list[RunningReqInfo]:
        return [r.info(r.decoding or r.req.req_id in finishing, self.cache.sole_tokens(r.hold))
                for r in self.running.values()]

    def _start(self, plan: StepPlan, new: list[GenerateReq]) -> None:
        now = time.time()
        for req in new:
            hold, _ = self.cache.lock_request(req)
            self.running[req.req_id] = RunningReq(req, list(req.output_ids), computed=hold.length, hold=hold,
                                                  prompt_key=cache_key(req.prompt_ids, req.images))
            plan.cached.append(hold.length)
            self._queue_times.append(now - req.arrival_time)
            if self.cache.enabled and not req.output_ids:  # a first admission, not a resume after a pause
                self.cache_queried_tokens += len(req.prompt_ids)
                self.cache_hit_tokens += hold.length
        plan.new_reqs = new

    def _release(self, plan: StepPlan, r: RunningReq) -> None:
        """`r` leaves the ranks in this step: its computed KV goes to the prefix cache."""
        self.cache.release(r.key(r.computed), range(r.computed), r.hold)
        plan.release.append(r.req.req_id)

    def _make_room(self, plan: StepPlan, need: int) -> None:
        """Optimistic admission only: pause the newest requests while this step's tokens would not
        fit in the pool, unused cached tokens counted as free. (Conservative admission never gets
        here with too little room.)"""
        while (free := self.max_total_token_num - self.kv_used()) < need:
            infos = [RunningReqInfo(r.req.req_id, r.computed, r.req.sampling.max_new_tokens, len(r.output_ids))
                     for r in self.running.values()]
            chosen = self.queue.select_requests_to_pause(infos, need - free)
            if not chosen:
                return
            for req_id in chosen:
                r = self.running.pop(req_id)
                self._release(plan, r)
                self.queue.requeue_paused([r.paused()])

    def _account(self, plan: StepPlan, outs: list[TokenOut]) -> None:
        """Follow the step's outcome, with the prefix-cache calls the ranks made, in their order."""
        for out in outs:
            if out.error is not None and out.token_id < 0 and (r := self.running.pop(out.req_id, None)) is not None:
                # Refused by the ranks at admission (no token): it computed nothing. A request that
                # fails later (its grammar broke) ends below like any other, with its KV.
                self.cache.unlock(r.hold)
                logger.error("router: request %d refused by the backend: %s", out.req_id, out.error)
        for c in plan.chunks:
            if (r := self.running.get(c.req_id)) is not None:
                r.computed += c.num_tokens
                self.prompt_tokens += c.num_tokens
                r.hold = self.cache.commit(r.key(r.computed), range(r.computed), r.hold).hold
        if plan.decode:
            for r in self.running.values():
                if r.decoding:
                    r.computed += 1
        for out in outs:
            r = self.running.get(out.req_id)
            if r is None:
                continue
            self.generated_tokens += 1
            r.output_ids.append(out.token_id)
            r.decoding = True
            if out.finish_reason is not None:  # the ranks already released it
                del self.running[out.req_id]
                self.cache.release(r.key(r.computed), range(r.computed), r.hold)
                self.queue.record_finished(len(r.output_ids))

    # ---- recovery ----------------------------------------------------------------------------
    def fail_step(self) -> list[int]:
        """After `backend.step` raised: the ranks dropped every request and freed all KV (see
        `ModelEngine.step`), so every running request fails; their ids are returned for the
        caller to tell their clients."""
        failed = list(self.running)
        self.running.clear()
        self._to_release.clear()
        self.cache.reset()
        return failed
