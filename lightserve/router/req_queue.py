"""The Efficient Router admission policy (docs/architecture.md, "The router step").

A waiting request joins the running batch only if the *peak* KV demand of the batch with it stays
within the KV pool. The peak is computed from each request's tokens held now and an estimate of
the tokens it may still generate (`peak_kv_demand`). With the conservative estimate
(`max_new_tokens - generated`, the default) the pool can never run out: no request is ever
paused or preempted. The optional optimistic mode admits more on a smaller estimate and, when
the pool does run short, names the newest requests to pause (`select_requests_to_pause`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from lightserve.io_struct import GenerateReq
from lightserve.prefix_cache.cache import PrefixCache
from lightserve.server_args import ServerArgs

# Optimistic mode without `router_max_new_token_len`: the guess of a request's output length is
# this quantile of the output lengths of recently finished requests. A high quantile keeps the
# guess safe for most requests; the median would admit more but pause far more often.
OBSERVED_OUTPUT_QUANTILE = 0.9
OBSERVED_OUTPUT_WINDOW = 256
# A request that already generated `g` tokens is assumed to produce at least `GROWTH * g` in all
# (LightLLM's rule): requests that outlive the guess are re-estimated upwards as they go.
GROWTH = 1.1


def peak_kv_demand(held: np.ndarray, left: np.ndarray) -> int:
    """The most KV slots a set of requests can need at once from now on, if none is added.

    `held[i]`: slots request i holds now (prompt + tokens generated so far); `left[i]`: tokens it
    may still generate. Every step each unfinished request writes one more token; a request that
    finishes frees all its slots at once.

    Why the formula: sort the requests by `left`, descending. Between two finishing times the
    demand only grows (every live request adds a token per step), so the peak is reached just
    before some request finishes. Request i (in sorted order) finishes after `left[i]` steps; at
    that moment every request with fewer tokens left has already finished and freed its slots,
    and requests 0..i are alive, each holding `held[j] + left[i]`. Hence

        peak = max_i( left[i] * (i + 1) + cumsum(held)[i] ).

    (With ties the largest index of a tied group counts the whole group, and `i = n-1` covers the
    slots held now.) The demand is monotone in every `left[i]`, so any upper bound on the tokens
    still to generate gives an upper bound on the real peak.
    """
    held = np.asarray(held, dtype=np.int64)
    left = np.asarray(left, dtype=np.int64)
    if held.size == 0:
        return 0
    order = np.argsort(-left, kind="stable")
    alive = np.arange(1, held.size + 1, dtype=np.int64)
    return int((left[order] * alive + np.cumsum(held[order])).max())


@dataclass(slots=True)
class RunningReqInfo:
    """What admission needs to know about one request of the running batch."""

    req_id: int  # ids grow with arrival (one counter in the httpserver): higher = newer
    # KV slots held once its prompt is in: prompt + tokens generated so far, less the cached tokens
    # it shares with other running requests (those count once, among the cache's protected tokens)
    held_tokens: int
    max_new_tokens: int
    generated: int
    ignore_eos: bool = False  # such a request surely runs to max_new_tokens: never guessed shorter
    # False while part of its prompt is still to be computed after the coming step (chunked
    # prefill): it does not yet generate one token per step like the others (see `ReqQueue`).
    in_lockstep: bool = True
    # Of `held_tokens`, cached tokens only this request locks: free (evictable) once it ends, so
    # they are its own like its uncached ones, and not counted again among the protected tokens.
    locked_alone: int = 0


@dataclass(slots=True)
class _Waiting:
    req: GenerateReq
    resumed: bool  # paused earlier: its generated tokens are recomputed with the prompt

    @property
    def held(self) -> int:
        return len(self.req.prompt_ids) + len(self.req.output_ids)


class ReqQueue:
    """The FIFO of waiting requests and the decision which of them may start now.

    Limits are plain arguments (not the server config) so that the policy can be tested and
    simulated on its own:

    - `max_total_token_num`: KV slots in the pool.
    - `running_max_req_size`: most requests in the running batch.
    - `batch_max_tokens`: most tokens prefilled by one new batch (prompt + recomputed output).
    - `router_token_ratio`: 0 = conservative. In (0, 1] = optimistic (LightLLM's meaning): while the
      running requests hold less than this share of the pool, the tokens still to generate are
      estimated from a guessed output length instead of `max_new_tokens`.
    - `router_max_new_token_len`: the guessed output length of optimistic mode. None: learned as a
      high quantile of recently finished requests (fed by `record_finished`); until something
      finished, the estimate stays conservative. Ignored in conservative mode, whose guarantee
      needs the full `max_new_tokens`.
    - `max_req_total_len`: most prompt + generated tokens of one request (the token table width),
      checked at the door only.
    - `chunked`: prompts are computed in chunks within a per-step token budget, beside the decode
      rows (`--chunked_prefill_size` > 0); `batch_max_tokens` then does not apply.

    Chunked prefill and the no-pause promise. `peak_kv_demand` assumes every request generates
    one token per step from now on. A request whose prompt is still being computed in chunks
    does not: it may start generating many steps later, and then finish later than the formula
    assumes, still holding its slots when the formula counted them free. Such a request is
    therefore counted at its most, `held + left`, for as long as it stays out of lockstep:

        demand <= peak_kv_demand(lockstep requests) + sum(held + left of the others).

    A request enters lockstep in the step that computes the rest of its prompt, so admission
    counts a new request as in lockstep when its whole prompt fits in what is left of the
    step's token budget. The bound holds at every step from the state it was computed on, and
    admission keeps it within the pool, so conservative mode still never pauses and never runs
    out, chunked or not.

    The prefix cache and the promise. Cached tokens nobody locks can be evicted whenever a step
    needs room: they count as free. Cached tokens one running request locks alone become
    evictable when it ends, like its uncached tokens: both count in its `held` (the part cached:
    `locked_alone`). Cached tokens that two or more running requests lock count once, as S (the
    cache's protected tokens less every `locked_alone`), and S is counted as taken for as long as
    the bound looks ahead. A waiting request that hits h cached tokens computes and holds only
    `held - h`; of its hit, the u tokens that fewer than two locks protect now (nobody's, or one
    running request's alone) are kept by its lock beyond their current lockers, so it adds u to
    the reserved tokens. Hence

        demand <= peak_kv_demand(lockstep) + sum(held + left of the others) + S + sum(u)

    over the running batch and the admitted candidates. It holds for the future: without new
    admissions, a token that becomes locked is one that a running request computed itself (in
    its `held` until it ends), and a token that goes from one locker to two was in S or in a
    `held` that lasts as long as one of its lockers, or in some u. Two candidates that hit the
    same tokens count them twice, which only errs on the safe side.
    """

    def __init__(
        self,
        max_total_token_num: int,
        running_max_req_size: int,
        batch_max_tokens: int,
        router_token_ratio: float = 0.0,
        router_max_new_token_len: Optional[int] = None,
        max_req_total_len: Optional[int] = None,
        chunked: bool = False,
    ):
        if max_total_token_num < 1 or running_max_req_size < 1 or batch_max_tokens < 1:
            raise ValueError("max_total_token_num, running_max_req_size and batch_max_tokens must be positive")
        if not 0.0 <= router_token_ratio <= 1.0:
            raise ValueError(f"router_token_ratio must be in [0, 1], got {router_token_ratio}")
        if router_max_new_token_len is not None and router_max_new_token_len < 1:
            raise ValueError("router_max_new_token_len must be positive")
        self.max_total_token_num = max_total_token_num
        self.running_max_req_size = running_max_req_size
        self.batch_max_tokens = batch_max_tokens
        self.router_token_ratio = router_token_ratio
        self.router_max_new_token_len = router_max_new_token_len
        self.max_req_total_len = max_req_total_len
        self.chunked = chunked
        self._waiting: deque[_Waiting] = deque()
        self._observed_output: deque[int] = deque(maxlen=OBSERVED_OUTPUT_WINDOW)

    @classmethod
    def from_args(cls, args: ServerArgs, max_total_token_num: int) -> "ReqQueue":
        """The queue of a server (router process) or of the offline `LLM`: one place, one policy."""
        optimistic = args.router_token_ratio > 0
        return cls(
            max_total_token_num=max_total_token_num,
            running_max_req_size=args.running_max_req_size,
            batch_max_tokens=args.resolved_batch_max_tokens(),
            router_token_ratio=args.router_token_ratio,
            router_max_new_token_len=args.router_max_new_token_len if optimistic else None,
            max_req_total_len=args.max_req_total_len,
            chunked=args.chunked_prefill_size > 0,
        )

    # ---- the door ----------------------------------------------------------------------------
    def check_request_fits(self, prompt_len: int, max_new_tokens: int) -> Optional[str]:
        """Why a request can never run (so it is refused now, not left waiting forever), or None.

        A request that passes always fits alone in an empty batch, so the FIFO never blocks on it.
        """
        total = prompt_len + max_new_tokens
        if prompt_len < 1:
            return "the prompt is empty"
        if self.max_req_total_len is not None and total > self.max_req_total_len:
            return (
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds max_req_total_len ({self.max_req_total_len})"
            )
        if total > self.max_total_token_num:
            return (
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds the KV cache capacity ({self.max_total_token_num} tokens)"
            )
        if not self.chunked and prompt_len > self.batch_max_tokens:
            return f"prompt ({prompt_len} tokens) exceeds batch_max_tokens ({self.batch_max_tokens})"
        return None

    # ---- the waiting queue -------------------------------------------------------------------
    def append(self, req: GenerateReq) -> None:
        self._waiting.append(_Waiting(req, resumed=False))

    def requeue_paused(self, reqs: Iterable[GenerateReq]) -> None:
        """Put paused requests (their `output_ids` filled) back at the head, oldest first.

        They go before every fresh request: they were admitted before those, and a paused request
        already cost the work it has to redo. Among all paused requests waiting, the oldest
        comes first.
        """
        resumed = [w for w in self._waiting if w.resumed]
        for _ in resumed:  # resumed requests always form the head of the queue
            self._waiting.popleft()
        resumed.extend(_Waiting(r, resumed=True) for r in reqs)
        resumed.sort(key=lambda w: w.req.req_id)
        self._waiting.extendleft(reversed(resumed))

    def abort(self, req_id: int) -> bool:
        """Drop a waiting request; False when it is not waiting (running, finished or unknown)."""
        for w in self._waiting:
            if w.req.req_id == req_id:
                self._waiting.remove(w)
                return True
        return False

    def __len__(self) -> int:
        return len(self._waiting)

    def record_finished(self, output_len: int) -> None:
        """Note the output length of a finished request (learns the optimistic guess)."""
        self._observed_output.append(output_len)

    # ---- admission ---------------------------------------------------------------------------
    def generate_new_batch(self, running: Sequence[RunningReqInfo], prefill_budget: Optional[int] = None,
                           cache: Optional[PrefixCache] = None) -> list[GenerateReq]:
        """Take from the head of the queue the requests that may start now, in FIFO order.

        Stops at the first request that does not fit (KV peak, batch size or prefill tokens):
        skipping it for smaller ones behind could starve a big request forever.

        `prefill_budget`: chunked mode, the prompt tokens this step may still compute. A request
        whose whole prompt fits in it is counted in lockstep; the first one that does not fit
        takes the rest of the budget (it continues next steps) and ends the batch.
        Unchunked: the first request of a new batch is exempt from `batch_max_tokens` (a resumed
        request's recompute may exceed it; a fresh one was checked at the door), so the head can
        always start once the running batch is empty.

        `cache`: the router's prefix cache; a request's cached tokens are neither computed nor
        held by it (see the class docstring). Probing it changes nothing.
        """
        room = self.running_max_req_size - len(running)
        if room <= 0 or not self._waiting or (prefill_budget is not None and prefill_budget <= 0):
            return []
        guess = self._output_len_guess() if self._is_optimistic(sum(r.held_tokens for r in running)) else None
        left_all = self._estimate_left(
            np.fromiter((r.max_new_tokens for r in running), dtype=np.int64, count=len(running)),
            np.fromiter((r.generated for r in running), dtype=np.int64, count=len(running)),
            np.fromiter((r.ignore_eos for r in running), dtype=bool, count=len(running)),
            guess,
        )
        held_all = np.fromiter((r.held_tokens for r in running), dtype=np.int64, count=len(running))
        lockstep = np.fromiter((r.in_lockstep for r in running), dtype=bool, count=len(running))
        held, left = held_all[lockstep], left_all[lockstep]
        reserved = int((held_all[~lockstep] + left_all[~lockstep]).sum())  # counted at their most
        if cache is not None:
            reserved += cache.protected_tokens - sum(r.locked_alone for r in running)
        admitted: list[GenerateReq] = []
        prefill_tokens = 0
        for w in self._waiting:
            if len(admitted) == room:
                break
            hit, unshared = cache.probe_request(w.req) if cache is not None else (0, 0)
            own = w.held - hit  # the tokens it computes and holds itself
            if prefill_budget is None:
                if admitted and prefill_tokens + own > self.batch_max_tokens:
                    break
                joins_lockstep = True
            else:
                if prefill_tokens >= prefill_budget:
                    break
                joins_lockstep = prefill_tokens + own <= prefill_budget
            sampling = w.req.sampling
            w_left = self._estimate_left(
                np.array([sampling.max_new_tokens]),
                np.array([len(w.req.output_ids)]),
                np.array([sampling.ignore_eos]),
                guess,
            )
            if joins_lockstep:
                cand_held, cand_left, cand_reserved = np.append(held, own), np.append(left, w_left), reserved + unshared
            else:
                cand_held, cand_left, cand_reserved = held, left, reserved + unshared + own + int(w_left[0])
            if peak_kv_demand(cand_held, cand_left) + cand_reserved > self.max_total_token_num:
                break
            held, left, reserved = cand_held, cand_left, cand_reserved
            prefill_tokens += own
            admitted.append(w.req)
            if not joins_lockstep:
                break  # it takes the rest of the step's budget
        for _ in admitted:
            self._waiting.popleft()
        return admitted

    def _is_optimistic(self, used_tokens: int) -> bool:
        # LightLLM's rule: optimism only while the pool is not busy; above the ratio the estimate
        # falls back to the conservative one, which limits how deep a shortage can get.
        return self.router_token_ratio > 0.0 and used_tokens < self.router_token_ratio * self.max_total_token_num

    def _output_len_guess(self) -> Optional[int]:
        if self.router_max_new_token_len is not None:
            return self.router_max_new_token_len
        if not self._observed_output:
            return None
        return int(math.ceil(np.quantile(np.fromiter(self._observed_output, dtype=np.int64), OBSERVED_OUTPUT_QUANTILE)))

    @staticmethod
    def _estimate_left(
        max_new: np.ndarray, generated: np.ndarray, ignore_eos: np.ndarray, guess: Optional[int]
    ) -> np.ndarray:
        """Tokens each request is assumed to still generate (never negative).

        `guess`: the assumed output length in optimistic mode, None for the conservative estimate.
        """
        total = max_new
        if guess is not None:
            grown = np.ceil(GROWTH * generated).astype(np.int64)
            total = np.where(ignore_eos, max_new, np.minimum(max_new, np.maximum(guess, grown)))
        return np.maximum(total - generated, 0)

    # ---- optimistic mode: running out of KV --------------------------------------------------
    def select_requests_to_pause(self, running: Sequence[RunningReqInfo], free_slots_needed: int) -> list[int]:
        """The newest running requests to pause so that the next decode step fits in the pool.

        `free_slots_needed`: how many slots the next step lacks (for a decode step: running
        requests minus free slots). Pausing a request frees its held slots and also removes its
        own one-slot need from the step, so each paused request covers `held_tokens + 1`.

        The oldest running request is never chosen: alone it always fits (the door check), so it
        keeps making progress and paused requests cannot livelock the server. The caller frees
        the chosen requests' KV and hands them to `requeue_paused`.
        """
        if free_slots_needed <= 0 or len(running) < 2:
            return []
        newest_first = sorted(running, key=lambda r: r.req_id, reverse=True)[:-1]
        chosen: list[int] = []
        covered = 0
        for r in newest_first:
            if covered >= free_slots_needed:
                break
            chosen.append(r.req_id)
            covered += r.held_tokens + 1
        return chosen
