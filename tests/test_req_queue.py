"""The Efficient Router admission policy: the peak formula, the queue, and simulated workloads.

The workload tests drive a simple decode loop: every step each running request generates one
token (its KV grows by one slot) and finishes at its own length <= max_new_tokens, freeing its
slots at once. Held KV = prompt + generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightserve.io_struct import GenerateReq, SamplingParams
from lightserve.router.req_queue import ReqQueue, RunningReqInfo, peak_kv_demand

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def make_req(req_id: int, prompt_len: int, max_new: int, output_len: int = 0, ignore_eos: bool = False) -> GenerateReq:
    return GenerateReq(
        req_id=req_id,
        prompt_ids=[1] * prompt_len,
        sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=ignore_eos),
        output_ids=[2] * output_len,
    )


def running_info(req_id: int, prompt_len: int, max_new: int, generated: int) -> RunningReqInfo:
    return RunningReqInfo(req_id=req_id, held_tokens=prompt_len + generated, max_new_tokens=max_new, generated=generated)


# ---- the peak formula ----------------------------------------------------------------------------
def brute_force_peak(held: list[int], left: list[int]) -> int:
    """Step the worst case: everyone generates all its `left` tokens, finishing frees the slots."""
    slots = list(held)
    todo = list(left)
    peak = sum(slots)
    while any(t > 0 for t in todo):
        for i, t in enumerate(todo):
            if t > 0:
                slots[i] += 1
                todo[i] -= 1
        peak = max(peak, sum(slots))
        slots = [0 if t == 0 else s for s, t in zip(slots, todo)]
    return peak


pairs = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=8)


@SETTINGS
@given(pairs)
def test_peak_equals_brute_force(reqs: list[tuple[int, int]]) -> None:
    held, left = [h for h, _ in reqs], [t for _, t in reqs]
    assert peak_kv_demand(np.array(held), np.array(left)) == brute_force_peak(held, left)


@SETTINGS
@given(pairs, st.data())
def test_peak_is_monotone_in_tokens_left(reqs: list[tuple[int, int]], data: st.DataObject) -> None:
    # The conservative guarantee rests on this: an upper bound on `left` bounds the real peak.
    held = np.array([h for h, _ in reqs])
    left = np.array([t for _, t in reqs])
    i = data.draw(st.integers(0, len(reqs) - 1))
    more = left.copy()
    more[i] += data.draw(st.integers(1, 20))
    assert peak_kv_demand(held, more) >= peak_kv_demand(held, left)


def test_peak_worked_example() -> None:
    # Two requests holding 10 each, 5 and 1 tokens to go: after one step both hold 11 (22); then
    # the short one frees its 11 and the long one reaches only 15.
    assert peak_kv_demand(np.array([10, 10]), np.array([1, 5])) == 22
    assert peak_kv_demand(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == 0


# ---- the door --------------------------------------------------------------------------------------
def test_check_request_fits_refusals() -> None:
    q = ReqQueue(max_total_token_num=1000, running_max_req_size=8, batch_max_tokens=300, max_req_total_len=800)
    assert q.check_request_fits(300, 500) is None
    assert "empty" in q.check_request_fits(0, 10)
    assert "max_req_total_len" in q.check_request_fits(300, 501)
    assert "batch_max_tokens" in q.check_request_fits(301, 10)
    roomy = ReqQueue(max_total_token_num=1000, running_max_req_size=8, batch_max_tokens=2000)
    assert roomy.check_request_fits(900, 100) is None
    assert "KV cache capacity" in roomy.check_request_fits(900, 101)


def test_constructor_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        ReqQueue(0, 8, 100)
    with pytest.raises(ValueError):
        ReqQueue(100, 8, 100, router_token_ratio=1.5)
    with pytest.raises(ValueError):
        ReqQueue(100, 8, 100, router_max_new_token_len=0)


# ---- the queue ---------------------------------------------------------------------------------------
def test_fifo_stops_at_first_misfit() -> None:
    q = ReqQueue(max_total_token_num=100, running_max_req_size=8, batch_max_tokens=1000)
    for req_id, (prompt, max_new) in enumerate([(60, 30), (50, 40), (5, 5)]):
        q.append(make_req(req_id, prompt, max_new))
    assert [r.req_id for r in q.generate_new_batch([])] == [0]
    # Request 2 would fit next to request 0, but jumping the queue could starve request 1.
    assert q.generate_new_batch([running_info(0, 60, 30, 10)]) == []
    assert len(q) == 2
    assert [r.req_id for r in q.generate_new_batch([])] == [1, 2]
    assert len(q) == 0


def test_admission_uses_the_peak_not_the_sum_of_reservations() -> None:
    q = ReqQueue(max_total_token_num=100, running_max_req_size=8, batch_max_tokens=1000)
    q.append(make_req(1, 30, 10))
    # Reserving prompt + max_new for both would take 80 + 40 = 120 slots. But the newcomer is done
    # within 10 steps: with the running request at 10 of 40 tokens, both hold 60 + 40 = 100 at
    # the newcomer's last step, then the running one grows alone to 80. Peak 100: it fits.
    # One token later the same moment costs 101.
    assert q.generate_new_batch([running_info(0, 40, 40, 11)]) == []
    assert [r.req_id for r in q.generate_new_batch([running_info(0, 40, 40, 10)])] == [1]


def test_running_max_req_size_and_batch_max_tokens() -> None:
    q = ReqQueue(max_total_token_num=10_000, running_max_req_size=3, batch_max_tokens=100)
    for req_id in range(6):
        q.append(make_req(req_id, 40, 10))
    assert [r.req_id for r in q.generate_new_batch([])] == [0, 1]  # 120 prefill tokens > 100
    running = [running_info(i, 40, 10, 1) for i in (0, 1)]
    assert [r.req_id for r in q.generate_new_batch(running)] == [2]  # 3 running at most
    assert q.generate_new_batch(running + [running_info(2, 40, 10, 1)]) == []


def test_abort_removes_only_waiting_requests() -> None:
    q = ReqQueue(max_total_token_num=100, running_max_req_size=8, batch_max_tokens=1000)
    for req_id in range(3):
        q.append(make_req(req_id, 10, 10))
    assert q.abort(1) is True
    assert q.abort(1) is False
    assert q.abort(99) is False
    assert [r.req_id for r in q.generate_new_batch([])] == [0, 2]


def test_requeued_paused_requests_go_first_oldest_first() -> None:
    q = ReqQueue(max_total_token_num=85, running_max_req_size=8, batch_max_tokens=1000)
    q.append(make_req(9, 50, 35))
    q.requeue_paused([make_req(7, 50, 35, output_len=30)])
    q.requeue_paused([make_req(5, 10, 10, output_len=2)])
    # Resumed requests hold prompt + output (recomputed) and need max_new - output more:
    # 5 holds 12 and needs 8 more, 7 holds 80 and needs 5: together they peak at 102 > 85.
    assert [r.req_id for r in q.generate_new_batch([])] == [5]
    assert [r.req_id for r in q.generate_new_batch([])] == [7]
    assert [r.req_id for r in q.generate_new_batch([])] == [9]


def test_resumed_head_may_exceed_batch_max_tokens() -> None:
    # Its recompute (prompt + output) is larger than one prefill normally takes, but it must not
    # wait forever: the first request of a batch is exempt.
    q = ReqQueue(max_total_token_num=1000, running_max_req_size=8, batch_max_tokens=100)
    q.requeue_paused([make_req(1, 90, 200, output_len=50)])
    q.append(make_req(2, 10, 10))
    assert [r.req_id for r in q.generate_new_batch([])] == [1]


# ---- optimistic mode -----------------------------------------------------------------------------------
def test_optimistic_mode_admits_more_once_outputs_are_short() -> None:
    def admitted(q: ReqQueue) -> int:
        for req_id in range(20):
            q.append(make_req(req_id, 10, 100))
        return len(q.generate_new_batch([]))

    conservative = ReqQueue(max_total_token_num=500, running_max_req_size=64, batch_max_tokens=10_000)
    optimistic = ReqQueue(500, 64, 10_000, router_token_ratio=0.9)
    assert admitted(ReqQueue(500, 64, 10_000, router_token_ratio=0.9)) == admitted(conservative) == 4
    for _ in range(10):
        optimistic.record_finished(15)
    assert admitted(optimistic) == 20  # 20 * (10 + 15) = 500
    fixed_guess = ReqQueue(500, 64, 10_000, router_token_ratio=0.9, router_max_new_token_len=40)
    assert admitted(fixed_guess) == 10


def test_optimistic_mode_is_conservative_when_busy_or_ignore_eos() -> None:
    q = ReqQueue(max_total_token_num=1000, running_max_req_size=64, batch_max_tokens=10_000, router_token_ratio=0.5)
    for _ in range(10):
        q.record_finished(10)
    q.append(make_req(1, 100, 400))
    busy = [running_info(0, 500, 400, 10)]  # holds 510 of 1000 slots, >= 50 %: conservative
    assert q.generate_new_batch(busy) == []
    calm = [running_info(0, 400, 400, 10)]  # both guessed to stop after ~10 tokens
    assert [r.req_id for r in q.generate_new_batch(calm)] == [1]
    # Requests with ignore_eos surely run to max_new_tokens, running or waiting: 390 and 400 more.
    calm_ignore_eos = [RunningReqInfo(0, held_tokens=410, max_new_tokens=400, generated=10, ignore_eos=True)]
    q.append(make_req(2, 100, 400, ignore_eos=True))
    assert q.generate_new_batch(calm_ignore_eos) == []
    assert q.abort(2)
    q.append(make_req(3, 100, 400))
    assert [r.req_id for r in q.generate_new_batch(calm_ignore_eos)] == [3]


def test_select_requests_to_pause_newest_first_never_the_oldest() -> None:
    q = ReqQueue(max_total_token_num=1000, running_max_req_size=8, batch_max_tokens=1000, router_token_ratio=1.0)
    running = [running_info(3, 100, 50, 5), running_info(9, 20, 50, 4), running_info(1, 50, 50, 9), running_info(6, 30, 50, 0)]
    assert q.select_requests_to_pause(running, 0) == []
    assert q.select_requests_to_pause(running, 25) == [9]  # 24 held + its own slot
    assert q.select_requests_to_pause(running, 26) == [9, 6]
    assert q.select_requests_to_pause(running, 10_000) == [9, 6, 3]
    assert q.select_requests_to_pause(running[:1], 10) == []


# ---- simulated workloads ------------------------------------------------------------------------------
@dataclass
class Workload:
    budget: int
    max_reqs: int
    batch_max: int
    reqs: list[GenerateReq]
    lengths: dict[int, int]  # req_id -> tokens it really generates (<= max_new_tokens)
    arrivals: dict[int, int]  # req_id -> step it arrives at
    aborts: dict[int, int] = field(default_factory=dict)  # req_id -> step it is aborted at (if waiting)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    budget = draw(st.integers(64, 1500))
    batch_max = draw(st.integers(16, 600))
    wl = Workload(budget, draw(st.integers(1, 12)), batch_max, [], {}, {})
    for req_id in range(draw(st.integers(1, 30))):
        prompt = draw(st.integers(1, min(batch_max, budget - 1)))
        max_new = draw(st.integers(1, budget - prompt))
        wl.reqs.append(make_req(req_id, prompt, max_new))
        wl.lengths[req_id] = draw(st.integers(1, max_new))
        wl.arrivals[req_id] = draw(st.integers(0, 40))
        if draw(st.integers(0, 9)) == 0:
            wl.aborts[req_id] = draw(st.integers(0, 60))
    return wl


@dataclass
class Live:
    req: GenerateReq
    generated: int

    def info(self) -> RunningReqInfo:
        return RunningReqInfo(
            self.req.req_id, len(self.req.prompt_ids) + self.generated, self.req.sampling.max_new_tokens, self.generated
        )


def simulate(wl: Workload, token_ratio: float = 0.0, guess: Optional[int] = None) -> int:
    """Run the workload to the end, checking the limits at every step; returns the pauses."""
    q = ReqQueue(wl.budget, wl.max_reqs, wl.batch_max, router_token_ratio=token_ratio, router_max_new_token_len=guess)
    waiting: list[int] = []  # our own FIFO mirror, to check the queue's order
    running: list[Live] = []
    finished: set[int] = set()
    aborted: set[int] = set()
    pauses = 0
    step = 0
    # Each step the oldest running request makes progress (it is never paused).
    horizon = max(wl.arrivals.values()) + sum(wl.lengths.values()) + 10
    while len(finished) + len(aborted) < len(wl.reqs):
        assert step < horizon, "a request starves"
        for r in wl.reqs:
            if wl.arrivals[r.req_id] == step:
                q.append(r)
                waiting.append(r.req_id)
            if wl.aborts.get(r.req_id) == step and r.req_id in waiting:
                assert q.abort(r.req_id)
                waiting.remove(r.req_id)
                aborted.add(r.req_id)
        infos = [live.info() for live in running]
        new = q.generate_new_batch(infos)
        # FIFO: the admitted are exactly the head of the queue.
        assert [r.req_id for r in new] == waiting[: len(new)]
        del waiting[: len(new)]
        assert len(running) + len(new) <= wl.max_reqs
        prefill = [len(r.prompt_ids) + len(r.output_ids) for r in new]
        assert len(new) <= 1 or sum(prefill) <= wl.batch_max
        if token_ratio == 0.0 and waiting and len(running) + len(new) < wl.max_reqs:
            head = next(r for r in wl.reqs if r.req_id == waiting[0])
            if not new or sum(prefill) + len(head.prompt_ids) <= wl.batch_max:
                # Not admitting the head must mean that its peak does not fit.
                lives = infos + [Live(r, 0).info() for r in new] + [Live(head, 0).info()]
                held = np.array([i.held_tokens for i in lives])
                left = np.array([i.max_new_tokens - i.generated for i in lives])
                assert peak_kv_demand(held, left) > wl.budget
        running += [Live(r, len(r.output_ids)) for r in new]
        used = sum(len(live.req.prompt_ids) + live.generated for live in running)
        assert used <= wl.budget
        short = len(running) - (wl.budget - used)  # the decode step needs one slot per request
        if short > 0:
            assert token_ratio > 0.0, "conservative admission ran out of KV"
            chosen = set(q.select_requests_to_pause([live.info() for live in running], short))
            assert min(live.req.req_id for live in running) not in chosen
            paused = [live for live in running if live.req.req_id in chosen]
            running = [live for live in running if live.req.req_id not in chosen]
            q.requeue_paused(
                [GenerateReq(p.req.req_id, p.req.prompt_ids, p.req.sampling, output_ids=[2] * p.generated) for p in paused]
            )
            waiting = sorted(chosen) + waiting
            pauses += len(paused)
            used = sum(len(live.req.prompt_ids) + live.generated for live in running)
            assert len(running) <= wl.budget - used
        for live in running:
            live.generated += 1
        assert sum(len(live.req.prompt_ids) + live.generated for live in running) <= wl.budget
        for live in running:
            if live.generated == wl.lengths[live.req.req_id]:
                finished.add(live.req.req_id)
                q.record_finished(live.generated)
        running = [live for live in running if live.req.req_id not in finished]
        step += 1
    assert not running and len(q) == 0 and not finished & aborted
    return pauses


@SETTINGS
@given(workloads())
def test_conservative_never_exceeds_kv_and_everyone_finishes(wl: Workload) -> None:
    assert simulate(wl) == 0


@SETTINGS
@given(workloads(), st.sampled_from([0.5, 1.0]), st.one_of(st.none(), st.integers(1, 64)))
def test_optimistic_pauses_newest_and_everyone_finishes(wl: Workload, ratio: float, guess: Optional[int]) -> None:
    simulate(wl, token_ratio=ratio, guess=guess)


def test_optimistic_mode_pauses_on_a_workload_that_outruns_its_guess() -> None:
    # Long outputs against a guess of 4 tokens: the pool must run short, and the pause path works.
    wl = Workload(200, 16, 1000, [make_req(i, 10, 100) for i in range(12)], {i: 100 for i in range(12)}, {i: 0 for i in range(12)})
    assert simulate(wl, token_ratio=1.0, guess=4) > 0
    assert simulate(wl) == 0
