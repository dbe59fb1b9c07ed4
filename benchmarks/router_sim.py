"""Router simulator: KV admission policies replayed on a synthetic workload, without a model.

Four policies share one KV budget and one cost model, and the step scheduler runs beside them:

- `er-conservative`: the Efficient Router (`lightserve.router.req_queue`), default mode. Admits a
  request only if the peak KV demand of the batch, assuming every request runs to
  max_new_tokens, fits. Never runs out of KV, never pauses.
- `er-optimistic`: the same queue with `router_token_ratio > 0`: outputs are guessed shorter
  (learned from finished requests, or `--max-new-token-len`), more requests run, and when KV
  runs short the newest requests are paused and recomputed later.
- `static`: TGI-style reservation of prompt + max_new_tokens slots per request at admission.
- `paged`: vLLM-style 16-token KV blocks allocated on demand (admission needs the prompt's blocks
  plus a 1 % watermark); when a decode step lacks blocks, the newest requests are preempted
  and recomputed later.

- `er-steps-N`: the real router `Scheduler` with `--chunked_prefill_size N` (conservative),
  driving `SimulatedRanks`, which counts KV slots and raises on the first step that would exceed
  the budget. Each step computes every decode row plus prompt chunks within N tokens; a prompt
  still being computed in chunks is counted at prompt + max_new_tokens until it completes (see
  `ReqQueue`), which keeps the no-pause, no-exhaustion promise. Its prefix cache is on; the
  `er-steps-N-nocache` row runs the same with `--disable_prefix_cache`.

Prefix sharing (`--shared-prefix-len L --shared-prefix-groups G`): every prompt starts with one
of G system prompts of L tokens (round-robin) and adds `--prompt-min`..`--prompt-max` tokens of
its own. Only the step rows model the prefix cache (a cached prefix is neither computed nor held
twice); the four policy rows compute and hold every prompt token as before.

Cost model (time unit: ms; defaults sized like a 7B model on one A100, stated, not measured):
a prefill pass costs `a + c * prefill_tokens`, a decode pass `a + b * batch + d * kv_tokens`
(fixed weight reads and launches, per-request work, attention reading the KV of the batch).
Recomputing a paused or preempted request is a prefill of its prompt plus its tokens so far.

Admission runs when nothing is running, or every `--admit-every` decode steps while requests
wait (the router's `router_max_wait_tokens`), the same cadence for every policy.

    python benchmarks/router_sim.py                      # burst: all requests at t=0
    python benchmarks/router_sim.py --rate 40 --json out.json
    python benchmarks/router_sim.py --shared-prefix-len 1024 --shared-prefix-groups 4
"""

from __future__ import annotations

import argparse
import json
import math
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional, Protocol, Sequence

import numpy as np

from lightserve.io_struct import GenerateReq, SamplingParams
from lightserve.router.req_queue import ReqQueue, RunningReqInfo
from lightserve.router.scheduler import Scheduler
from lightserve.router.simulated_ranks import SimulatedRanks

BLOCK = 16  # tokens per KV block of the paged policy
WATERMARK = 0.01  # share of blocks the paged policy keeps free at admission (vLLM's default)


@dataclass
class Cost:
    a: float = 7.0  # ms per forward pass
    b: float = 0.03  # ms per request in a decode batch
    c: float = 0.07  # ms per prefilled token
    d: float = 0.00025  # ms per KV token read by decode attention

    def prefill(self, tokens: int) -> float:
        return self.a + self.c * tokens

    def decode(self, batch: int, kv_tokens: int) -> float:
        return self.a + self.b * batch + self.d * kv_tokens


@dataclass
class SimReq:
    req_id: int
    arrival: float  # ms
    prompt: int
    output: int  # tokens it really generates before its EOS
    max_new: int
    tokens: list[int]  # the prompt's ids (only the prefix cache of the step rows looks at them)
    generated: int = 0
    finish: float = math.nan

    @property
    def held(self) -> int:
        return self.prompt + self.generated


@dataclass
class Limits:
    budget: int
    max_reqs: int
    batch_max_tokens: int


class Policy(Protocol):
    """Owns the waiting queue and decides admission and what to evict when KV runs short."""

    def enqueue(self, req: SimReq) -> None: ...
    def waiting(self) -> int: ...
    def admit(self, running: Sequence[SimReq]) -> list[SimReq]: ...
    def evict_for_decode(self, running: Sequence[SimReq]) -> tuple[list[SimReq], bool]:
        """(requests to pause or preempt, whether the step was short of KV)."""
        ...
    def requeue(self, reqs: list[SimReq]) -> None: ...
    def finished(self, req: SimReq) -> None: ...


class EfficientRouter:
    def __init__(self, limits: Limits, token_ratio: float, max_new_token_len: Optional[int]):
        self.limits = limits
        self.queue = ReqQueue(
            limits.budget, limits.max_reqs, limits.batch_max_tokens,
            router_token_ratio=token_ratio, router_max_new_token_len=max_new_token_len,
        )
        self.by_id: dict[int, SimReq] = {}

    @staticmethod
    def _message(r: SimReq) -> GenerateReq:
        return GenerateReq(r.req_id, [0] * r.prompt, SamplingParams(max_new_tokens=r.max_new), output_ids=[0] * r.generated)

    @staticmethod
    def _info(r: SimReq) -> RunningReqInfo:
        return RunningReqInfo(r.req_id, r.held, r.max_new, r.generated)

    def enqueue(self, req: SimReq) -> None:
        self.by_id[req.req_id] = req
        self.queue.append(self._message(req))

    def waiting(self) -> int:
        return len(self.queue)

    def admit(self, running: Sequence[SimReq]) -> list[SimReq]:
        return [self.by_id[m.req_id] for m in self.queue.generate_new_batch([self._info(r) for r in running])]

    def evict_for_decode(self, running: Sequence[SimReq]) -> tuple[list[SimReq], bool]:
        short = len(running) - (self.limits.budget - sum(r.held for r in running))
        if short <= 0:
            return [], False
        chosen = set(self.queue.select_requests_to_pause([self._info(r) for r in running], short))
        return [r for r in running if r.req_id in chosen], True

    def requeue(self, reqs: list[SimReq]) -> None:
        self.queue.requeue_paused([self._message(r) for r in reqs])

    def finished(self, req: SimReq) -> None:
        self.queue.record_finished(req.generated)


class FifoPolicy(ABC):
    """A FIFO that admits while `fits` says so; requeued requests go back to the head."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.queue: deque[SimReq] = deque()

    def enqueue(self, req: SimReq) -> None:
        self.queue.append(req)

    def waiting(self) -> int:
        return len(self.queue)

    @abstractmethod
    def fits(self, running: Sequence[SimReq], new: Sequence[SimReq], candidate: SimReq) -> bool:
        """Whether `candidate` may join the running requests and those admitted before it."""

    @abstractmethod
    def evict_for_decode(self, running: Sequence[SimReq]) -> tuple[list[SimReq], bool]: ...

    def admit(self, running: Sequence[SimReq]) -> list[SimReq]:
        new: list[SimReq] = []
        prefill = 0
        while self.queue and len(running) + len(new) < self.limits.max_reqs:
            head = self.queue[0]
            if new and prefill + head.held > self.limits.batch_max_tokens:
                break
            if not self.fits(running, new, head):
                break
            new.append(self.queue.popleft())
            prefill += head.held
        return new

    def requeue(self, reqs: list[SimReq]) -> None:
        self.queue.extendleft(sorted(reqs, key=lambda r: r.req_id, reverse=True))

    def finished(self, req: SimReq) -> None:
        pass


class StaticReservation(FifoPolicy):
    def fits(self, running: Sequence[SimReq], new: Sequence[SimReq], candidate: SimReq) -> bool:
        reserved = sum(r.prompt + r.max_new for r in (*running, *new))
        return reserved + candidate.prompt + candidate.max_new <= self.limits.budget

    def evict_for_decode(self, running: Sequence[SimReq]) -> tuple[list[SimReq], bool]:
        return [], False  # the reservation covers every request to its max_new_tokens


class PagedBlocks(FifoPolicy):
    def __init__(self, limits: Limits):
        super().__init__(limits)
        self.blocks = limits.budget // BLOCK

    @staticmethod
    def _blocks(tokens: int) -> int:
        return -(-tokens // BLOCK)

    def fits(self, running: Sequence[SimReq], new: Sequence[SimReq], candidate: SimReq) -> bool:
        used = sum(self._blocks(r.held) for r in (*running, *new))
        return used + self._blocks(candidate.held) <= self.blocks - math.ceil(WATERMARK * self.blocks)

    def evict_for_decode(self, running: Sequence[SimReq]) -> tuple[list[SimReq], bool]:
        free = self.blocks - sum(self._blocks(r.held) for r in running)
        need = sum(1 for r in running if r.held % BLOCK == 0)  # the next token opens a block
        if need <= free:
            return [], False
        victims: list[SimReq] = []
        for r in sorted(running, key=lambda r: r.req_id, reverse=True)[:-1]:  # newest first
            if need <= free:
                break
            victims.append(r)
            free += self._blocks(r.held)
            need -= r.held % BLOCK == 0
        return victims, True


@dataclass
class Result:
    policy: str
    steps: int = 0  # decode steps
    prefill_passes: int = 0
    sim_time_s: float = 0.0
    throughput_tok_s: float = 0.0  # generated tokens (each counted once) per simulated second
    mean_batch: float = 0.0
    mean_kv_occupancy_pct: float = 0.0  # tokens actually held / budget, averaged over decode steps
    prefill_tokens: int = 0  # prompt tokens computed (cache hits are not)
    pauses: int = 0  # pauses (er-optimistic) or preemptions (paged)
    kv_exhaustion_events: int = 0  # decode steps that found the KV short
    recomputed_tokens: int = 0
    mean_latency_s: float = 0.0
    p99_latency_s: float = 0.0


def simulate(name: str, policy: Policy, reqs: list[SimReq], limits: Limits, cost: Cost, admit_every: int) -> Result:
    res = Result(name)
    pending = deque(sorted(reqs, key=lambda r: (r.arrival, r.req_id)))
    running: list[SimReq] = []
    done: list[SimReq] = []
    now = 0.0
    since_admit = admit_every
    batch_sum = kv_sum = 0
    while len(done) < len(reqs):
        while pending and pending[0].arrival <= now:
            policy.enqueue(pending.popleft())
        if not running and not policy.waiting():
            now = pending[0].arrival
            continue
        if policy.waiting() and (not running or since_admit >= admit_every):
            since_admit = 0
            new = policy.admit(running)
            if new:
                now += cost.prefill(sum(r.held for r in new))
                res.prefill_passes += 1
                res.prefill_tokens += sum(r.held for r in new)
                res.recomputed_tokens += sum(r.generated for r in new)
                running += new
        assert running, "the head of the queue must fit into an empty batch"
        victims, short = policy.evict_for_decode(running)
        res.kv_exhaustion_events += short
        if victims:
            res.pauses += len(victims)
            gone = {r.req_id for r in victims}
            running = [r for r in running if r.req_id not in gone]
            policy.requeue(victims)
        kv = sum(r.held for r in running)
        res.steps += 1
        batch_sum += len(running)
        kv_sum += kv
        now += cost.decode(len(running), kv)
        since_admit += 1
        for r in running:
            r.generated += 1
            if r.generated == r.output:
                r.finish = now
                done.append(r)
                policy.finished(r)
        running = [r for r in running if r.generated < r.output]
    latency = np.array([r.finish - r.arrival for r in done]) / 1000.0
    res.sim_time_s = now / 1000.0
    res.throughput_tok_s = sum(r.output for r in done) / res.sim_time_s
    res.mean_batch = batch_sum / res.steps
    res.mean_kv_occupancy_pct = 100.0 * kv_sum / (res.steps * limits.budget)
    res.mean_latency_s = float(latency.mean())
    res.p99_latency_s = float(np.quantile(latency, 0.99))
    return res


def simulate_steps(name: str, reqs: list[SimReq], limits: Limits, cost: Cost, admit_every: int,
                   chunked_prefill_size: int, prefix_cache: bool = True) -> Result:
    """The real `Scheduler` (token budget per step, decode rows and prompt chunks in one pass)
    against `SimulatedRanks`, which raises if a step ever needs more KV than the budget. A step
    costs `a + b * decode_rows + c * chunk_tokens + d * kv_tokens`, where the KV read is that of
    the running requests (cached tokens nobody uses are not read)."""
    res = Result(name)
    ranks = SimulatedRanks(limits.budget, {r.req_id: r.output for r in reqs}.__getitem__, prefix_cache)
    queue = ReqQueue(limits.budget, limits.max_reqs, limits.batch_max_tokens, chunked=chunked_prefill_size > 0)
    scheduler = Scheduler(queue, ranks, limits.budget, chunked_prefill_size, admit_every, prefix_cache)
    pending = deque(sorted(reqs, key=lambda r: (r.arrival, r.req_id)))
    by_id = {r.req_id: r for r in reqs}
    now = 0.0
    kv_sum = finished = 0
    while finished < len(reqs):
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            scheduler.add(GenerateReq(r.req_id, r.tokens, SamplingParams(max_new_tokens=r.max_new)))
        if not scheduler.has_work:
            now = pending[0].arrival
            continue
        outs = scheduler.step()
        decode_rows, chunk_tokens = ranks.decode_rows[-1], ranks.step_tokens[-1] - ranks.decode_rows[-1]
        kv_read = sum(len(r.slots) for r in ranks.reqs.values())
        now += cost.a + cost.b * decode_rows + cost.c * chunk_tokens + cost.d * kv_read
        res.steps += 1
        res.prefill_passes += chunk_tokens > 0
        res.prefill_tokens += chunk_tokens
        kv_sum += ranks.used
        for out in outs:
            if out.finish_reason is not None:
                by_id[out.req_id].finish = now
                finished += 1
    latency = np.array([r.finish - r.arrival for r in reqs]) / 1000.0
    res.pauses = ranks.released_running  # no aborts here: every release of a running request is a pause
    res.sim_time_s = now / 1000.0
    res.throughput_tok_s = sum(r.output for r in reqs) / res.sim_time_s
    res.mean_batch = float(np.mean(ranks.decode_rows))
    res.mean_kv_occupancy_pct = 100.0 * kv_sum / (res.steps * limits.budget)
    res.mean_latency_s = float(latency.mean())
    res.p99_latency_s = float(np.quantile(latency, 0.99))
    return res


def make_workload(args: argparse.Namespace) -> list[SimReq]:
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(args.prompt_min, args.prompt_max + 1, args.num_requests)
    outputs = rng.integers(args.output_min, args.output_max + 1, args.num_requests)
    if args.rate > 0:  # Poisson arrivals: exponential gaps, rate in requests per second
        arrivals = np.cumsum(rng.exponential(1000.0 / args.rate, args.num_requests))
    else:
        arrivals = np.zeros(args.num_requests)
    # Token ids from a large vocabulary: prompts share nothing by chance, only the system prompts.
    systems = [rng.integers(1, 50_000, args.shared_prefix_len).tolist() for _ in range(args.shared_prefix_groups)]
    reqs = []
    for i, (t, p, o) in enumerate(zip(arrivals, prompts, outputs)):
        tokens = systems[i % len(systems)] + rng.integers(1, 50_000, int(p)).tolist()
        reqs.append(SimReq(i, float(t), len(tokens), int(o), args.max_new_tokens, tokens))
    return reqs


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0, help="Poisson arrival rate in requests/s; 0: all at t=0")
    p.add_argument("--prompt-min", type=int, default=32)
    p.add_argument("--prompt-max", type=int, default=512)
    p.add_argument("--output-min", type=int, default=32)
    p.add_argument("--output-max", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256, help="what every request asks for (>= --output-max)")
    p.add_argument("--kv-budget", type=int, default=32768, help="KV slots (tokens), the same for every policy")
    p.add_argument("--running-max-req-size", type=int, default=256)
    p.add_argument("--batch-max-tokens", type=int, default=8192)
    p.add_argument("--admit-every", type=int, default=6, help="decode steps between admissions while requests wait")
    p.add_argument("--token-ratio", type=float, default=0.9, help="router_token_ratio of er-optimistic")
    p.add_argument("--max-new-token-len", type=int, default=None,
                   help="router_max_new_token_len of er-optimistic (default: learned from finished requests)")
    p.add_argument("--cost", type=float, nargs=4, metavar=("A", "B", "C", "D"), default=list(asdict(Cost()).values()),
                   help="ms per pass, per decode request, per prefill token, per KV token read")
    p.add_argument("--chunked-prefill-sizes", default="512",
                   help="budgets of the step-scheduler rows (er-steps-N: the real Scheduler, conservative); "
                        "0: whole prompts in steps of their own")
    p.add_argument("--shared-prefix-len", type=int, default=0,
                   help="tokens of the system prompt every prompt starts with (0: no sharing)")
    p.add_argument("--shared-prefix-groups", type=int, default=1, help="distinct system prompts, round-robin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.max_new_tokens < args.output_max:
        p.error("--max-new-tokens must be >= --output-max (a request never generates more than it asks for)")
    if args.shared_prefix_len < 0 or args.shared_prefix_groups < 1:
        p.error("--shared-prefix-len must be >= 0 and --shared-prefix-groups >= 1")
    if not 0.0 < args.token_ratio <= 1.0:
        p.error("--token-ratio must be in (0, 1] (0 would make er-optimistic conservative)")
    return args


def main(argv: Optional[list[str]] = None) -> list[Result]:
    args = parse_args(argv)
    limits = Limits(args.kv_budget, args.running_max_req_size, args.batch_max_tokens)
    cost = Cost(*args.cost)
    door = ReqQueue(limits.budget, limits.max_reqs, limits.batch_max_tokens)
    for r in make_workload(args):
        reason = door.check_request_fits(r.prompt, r.max_new)
        if reason:
            raise SystemExit(f"request {r.req_id} can never run: {reason}")
    policies = {
        "er-conservative": lambda: EfficientRouter(limits, 0.0, None),
        "er-optimistic": lambda: EfficientRouter(limits, args.token_ratio, args.max_new_token_len),
        "static": lambda: StaticReservation(limits),
        "paged": lambda: PagedBlocks(limits),
    }
    results = []
    started = time.perf_counter()
    for name, make in policies.items():
        results.append(simulate(name, make(), make_workload(args), limits, cost, args.admit_every))
    for size in (int(x) for x in args.chunked_prefill_sizes.split(",") if x.strip()):
        for cache in (True, False):
            results.append(simulate_steps(f"er-steps-{size}" + ("" if cache else "-nocache"), make_workload(args),
                                          limits, cost, args.admit_every, size, cache))
    wall = time.perf_counter() - started

    arrival = f"Poisson {args.rate:g} req/s" if args.rate > 0 else "all at t=0"
    shared = (f"shared prefixes {args.shared_prefix_groups} x {args.shared_prefix_len} tokens + "
              if args.shared_prefix_len else "")
    print(
        f"{args.num_requests} requests ({arrival}), prompts {shared}{args.prompt_min}-{args.prompt_max}, outputs "
        f"{args.output_min}-{args.output_max}, max_new_tokens {args.max_new_tokens}, KV budget {args.kv_budget}, "
        f"seed {args.seed}; cost a,b,c,d = {', '.join(f'{x:g}' for x in args.cost)} ms"
    )
    head = f"{'policy':<22}{'batch':>7}{'KV occ %':>9}{'pauses':>8}{'KV short':>9}{'recomp tok':>11}" \
           f"{'prefill tok':>12}{'tok/s':>9}{'steps':>7}{'lat s':>7}{'p99 s':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.policy:<22}{r.mean_batch:>7.1f}{r.mean_kv_occupancy_pct:>9.1f}{r.pauses:>8}{r.kv_exhaustion_events:>9}"
            f"{r.recomputed_tokens:>11}{r.prefill_tokens:>12}{r.throughput_tok_s:>9.0f}{r.steps:>7}{r.mean_latency_s:>7.2f}{r.p99_latency_s:>7.2f}"
        )
    print(f"(simulated in {wall:.1f} s)")
    if args.json:
        payload = {"args": vars(args), "results": [asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return results


if __name__ == "__main__":
    main()
