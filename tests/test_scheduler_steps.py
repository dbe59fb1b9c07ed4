"""The real Scheduler and ReqQueue replayed on random workloads against `SimulatedRanks`, which
counts KV slots and raises the moment a step would need more than the pool.

Conservative admission must never pause and never run the pool out, with chunked prefill at any
budget or without it; optimistic admission may pause, and everyone must finish either way. The
chunked steps must also keep their shape: every decode row every step, the budget never passed
by prompt chunks, FIFO admission.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from lightserve.io_struct import GenerateReq, SamplingParams, StepPlan
from lightserve.router.req_queue import ReqQueue
from lightserve.router.scheduler import Scheduler
from lightserve.router.simulated_ranks import SimulatedRanks

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


@dataclass
class Workload:
    pool: int
    max_reqs: int
    budget: int  # chunked_prefill_size; 0 = whole prompts
    reqs: list[GenerateReq]
    lengths: dict[int, int]  # tokens each request generates before its EOS
    arrivals: dict[int, int]
    aborts: dict[int, int] = field(default_factory=dict)  # req_id -> step at which its client leaves


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    pool = draw(st.integers(64, 1200))
    wl = Workload(pool, draw(st.integers(1, 12)), draw(st.sampled_from([0, 1, 3, 16, 64, 512])), [], {}, {})
    # Prompts share prefixes as chat traffic does: a few system prompts, then a tail of their own
    # from a small alphabet (so tails share too). Every sampled token is 0, so a prompt ending in
    # zeros may also hit the cached answer of an earlier request.
    bases = [[7] * draw(st.integers(0, 300)), [8] * draw(st.integers(1, 40)) + [0] * 5, []]
    for req_id in range(draw(st.integers(1, 25))):
        base = draw(st.sampled_from(bases))
        tail = draw(st.lists(st.integers(0, 2), min_size=1, max_size=120))
        prompt_ids = (base + tail)[: pool - 1]
        max_new = draw(st.integers(1, min(200, pool - len(prompt_ids))))
        wl.reqs.append(GenerateReq(req_id, prompt_ids, SamplingParams(max_new_tokens=max_new)))
        wl.lengths[req_id] = draw(st.integers(1, max_new))
        wl.arrivals[req_id] = draw(st.integers(0, 30))
        if draw(st.integers(0, 9)) == 0:
            wl.aborts[req_id] = draw(st.integers(0, 60))
    return wl


class CheckedRanks(SimulatedRanks):
    """Also checks the shape of every plan against the scheduler's own state before running it."""

    def __init__(self, wl: Workload, prefix_cache: bool):
        super().__init__(wl.pool, wl.lengths.__getitem__, prefix_cache)
        self.wl = wl
        self.released: list[int] = []
        self.admitted: list[int] = []

    def step(self, plan: StepPlan):
        self.released += plan.release
        self.admitted += [r.req_id for r in plan.new_reqs]
        decoding = sum(r.decoding for req_id, r in self.reqs.items() if req_id not in plan.release)
        chunk_tokens = sum(c.num_tokens for c in plan.chunks)
        if self.wl.budget:  # every decode row every step; chunks within what the decode rows leave
            assert plan.decode == (decoding > 0)
            assert chunk_tokens <= max(0, self.wl.budget - decoding), plan
        elif plan.chunks:  # whole prompts: a prefill step of its own
            assert not plan.decode
        return super().step(plan)


def replay(wl: Workload, token_ratio: float = 0.0, prefix_cache: bool = True) -> CheckedRanks:
    ranks = CheckedRanks(wl, prefix_cache)
    queue = ReqQueue(wl.pool, wl.max_reqs, batch_max_tokens=400, router_token_ratio=token_ratio,
                     max_req_total_len=wl.pool, chunked=wl.budget > 0)
    scheduler = Scheduler(queue, ranks, wl.pool, wl.budget, max_wait_steps=3, prefix_cache=prefix_cache)
    done: set[int] = set()
    gone: set[int] = set()
    step = 0
    horizon = 40 + sum(len(r.prompt_ids) + wl.lengths[r.req_id] for r in wl.reqs) * 3
    while len(done | gone) < len(wl.reqs):
        assert step < horizon, "a request starves"
        for r in wl.reqs:
            if wl.arrivals[r.req_id] == step:
                assert queue.check_request_fits(len(r.prompt_ids), r.sampling.max_new_tokens) is None
                scheduler.add(r)
            if wl.aborts.get(r.req_id) == step and wl.arrivals[r.req_id] <= step and r.req_id not in done:
                scheduler.abort(r.req_id)
                gone.add(r.req_id)
        for out in scheduler.step():
            assert out.req_id not in gone and out.error is None
            if out.finish_reason is not None:
                done.add(out.req_id)
        assert scheduler.kv_free_expected() == len(ranks.free)  # the router's count is the ranks' count
        ranks.check_ownership()
        step += 1
    while scheduler.has_work:  # the last aborts still reach the ranks
        scheduler.step()
    assert not ranks.reqs and not scheduler.running and len(queue) == 0
    assert ranks.cache.protected_tokens == 0 and ranks.cache.total_tokens == scheduler.cache.total_tokens
    scheduler.flush_cache()
    scheduler.step()
    assert len(ranks.free) == wl.pool and scheduler.cache.total_tokens == 0  # the pool is whole again
    assert ranks.admitted == sorted(ranks.admitted, key=lambda i: (wl.arrivals[i], i)) or token_ratio > 0
    return ranks


@SETTINGS
@given(workloads(), st.booleans())
def test_conservative_admission_never_pauses_or_runs_out_chunked_or_not(wl: Workload, prefix_cache: bool) -> None:
    ranks = replay(wl, prefix_cache=prefix_cache)  # SimulatedRanks raises PoolExhausted if a step needs more than the pool
    aborted_running = set(wl.aborts) & set(ranks.admitted)
    assert set(ranks.released) <= aborted_running  # releases are aborts only: no pause
    assert ranks.peak_used <= wl.pool


@SETTINGS
@given(workloads(), st.sampled_from([0.5, 1.0]))
def test_optimistic_admission_pauses_and_everyone_finishes(wl: Workload, ratio: float) -> None:
    ranks = replay(wl, token_ratio=ratio)
    assert ranks.peak_used <= wl.pool


def test_a_long_prompt_is_cut_into_budget_sized_chunks_beside_the_decode_rows() -> None:
    wl = Workload(pool=5000, max_reqs=8, budget=64, reqs=[
        GenerateReq(0, [1] * 10, SamplingParams(max_new_tokens=50)),
        GenerateReq(1, [2] * 300, SamplingParams(max_new_tokens=5)),  # shares no prefix with request 0
    ], lengths={0: 50, 1: 5}, arrivals={0: 0, 1: 2})
    ranks = replay(wl)
    # Request 0 decodes every step while request 1's prompt goes in 63-token chunks (64 - 1 decode row).
    assert max(ranks.step_tokens) == 64
    assert ranks.step_tokens[2:8] == [64, 64, 64, 64, 49, 2]  # 63 * 4 + 48 = 300, plus the decode rows


def test_a_later_request_reuses_a_finished_prompt_and_part_of_its_answer() -> None:
    """Request 0 leaves after 3 tokens: its prompt and the 2 answer tokens it computed are cached.
    Request 1 sends that prompt, the whole answer and 10 tokens of its own: it hits 102 tokens
    (the hit ends inside the answer) and computes 11."""
    wl = Workload(pool=400, max_reqs=4, budget=0, reqs=[
        GenerateReq(0, [5] * 100, SamplingParams(max_new_tokens=3)),
        GenerateReq(1, [5] * 100 + [0, 0, 0] + [6] * 10, SamplingParams(max_new_tokens=2)),
    ], lengths={0: 3, 1: 2}, arrivals={0: 0, 1: 4})
    ranks = replay(wl)
    assert ranks.hit_tokens == 102
    assert ranks.step_tokens[:5] == [100, 1, 1, 11, 1]  # (then the flush)
    assert replay(wl, prefix_cache=False).step_tokens[:5] == [100, 1, 1, 113, 1]


def test_requests_with_the_same_new_prefix_admitted_in_one_step_each_compute_it() -> None:
    """Nothing is cached when both arrive: each computes the prefix, and the second copy's slots
    are freed when it is handed to the cache (the cache keeps the first)."""
    wl = Workload(pool=300, max_reqs=4, budget=0, reqs=[
        GenerateReq(0, [5] * 50 + [1], SamplingParams(max_new_tokens=4)),
        GenerateReq(1, [5] * 50 + [2], SamplingParams(max_new_tokens=4)),
    ], lengths={0: 4, 1: 4}, arrivals={0: 0, 1: 0})
    ranks = replay(wl)
    assert ranks.hit_tokens == 0 and ranks.step_tokens[0] == 102
