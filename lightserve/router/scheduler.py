"""The router's step: admit, run (prefill or decode), account.

Shared by the router process (backend = the tensor-parallel workers over rpyc) and the
offline `LLM` (backend = an in-process `ModelEngine`), so there is one scheduling policy.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Optional, Protocol

from lightserve.io_struct import GenerateReq, TokenOut
from lightserve.router.req_queue import ReqQueue, RunningReqInfo


class Backend(Protocol):
    """The batch operations of DESIGN §3 (`ModelEngine`, or all ranks through rpyc)."""

    def prefill(self, batch_id: int, reqs: list[GenerateReq]) -> list[TokenOut]: ...
    def decode(self, batch_id: int) -> list[TokenOut]: ...
    def filter(self, batch_id: int, keep_req_ids: list[int]) -> None: ...
    def merge(self, batch_id: int, other_id: int) -> None: ...
    def pause(self, batch_id: int, req_ids: list[int]) -> list[GenerateReq]: ...
    def remove(self, batch_id: int) -> None: ...


@dataclass
class RunningReq:
    req: GenerateReq
    generated: int  # tokens generated, incl. those recomputed after a pause

    def info(self) -> RunningReqInfo:
        return RunningReqInfo(
            req_id=self.req.req_id,
            held_tokens=len(self.req.prompt_ids) + self.generated,
            max_new_tokens=self.req.sampling.max_new_tokens,
            generated=self.generated,
            ignore_eos=self.req.sampling.ignore_eos,
        )


class Scheduler:
    def __init__(self, queue: ReqQueue, backend: Backend, max_wait_steps: int, max_total_token_num: int):
        self.queue = queue
        self.backend = backend
        self.max_wait_steps = max_wait_steps
        self.max_total_token_num = max_total_token_num
        self.running: dict[int, RunningReq] = {}
        self.batch_id: Optional[int] = None  # the one running batch on the backend
        self._batch_ids = itertools.count()
        self._steps_since_admission = 0
        self._aborted: set[int] = set()
        self._queue_times: list[float] = []
        self._prefilling: Optional[tuple[int, list[int]]] = None  # (batch id, request ids) in flight
        self._unmerged: Optional[int] = None  # a prefilled batch whose merge is in flight
        # Running totals for the stats log: tokens prefilled (incl. recomputed after a pause)
        # and tokens generated.
        self.prompt_tokens = 0
        self.generated_tokens = 0

    # ---- inputs ------------------------------------------------------------------------------
    def add(self, req: GenerateReq) -> None:
        self.queue.append(req)

    def abort(self, req_id: int) -> None:
        """Forget a request: dropped from the queue now, from the running batch next step."""
        if not self.queue.abort(req_id) and req_id in self.running:
            self._aborted.add(req_id)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or len(self.queue) > 0

    def kv_used(self) -> int:
        """KV slots the running requests hold (each holds prompt + generated - 1: the last
        sampled token enters the cache on the next step)."""
        return sum(len(r.req.prompt_ids) + r.generated - 1 for r in self.running.values())

    def take_queue_times(self) -> list[float]:
        """Queue waits of the requests admitted since the last call."""
        times, self._queue_times = self._queue_times, []
        return times

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[TokenOut]:
        self._prefilling = self._unmerged = None
        self._drop_aborted()
        new_reqs = self._admit()
        if new_reqs:
            outs = self._prefill(new_reqs)
        elif self.running:
            self._make_room_for_decode()
            outs = self.backend.decode(self.batch_id) if self.running else []
            self._steps_since_admission += 1
        else:
            return []
        self._account(outs)
        return outs

    # ---- parts of the step -------------------------------------------------------------------
    def _admit(self) -> list[GenerateReq]:
        if not len(self.queue):
            return []
        if self.running and self._steps_since_admission < self.max_wait_steps:
            return []
        self._steps_since_admission = 0
        return self.queue.generate_new_batch([r.info() for r in self.running.values()])

    def _prefill(self, reqs: list[GenerateReq]) -> list[TokenOut]:
        new_id = next(self._batch_ids)
        self._prefilling = (new_id, [r.req_id for r in reqs])
        outs = self.backend.prefill(new_id, reqs)
        self._prefilling = None
        self.prompt_tokens += sum(len(r.prompt_ids) + len(r.output_ids) for r in reqs)
        now = time.time()
        for r in reqs:
            self.running[r.req_id] = RunningReq(r, len(r.output_ids))
            self._queue_times.append(now - r.arrival_time)
        if self.batch_id is None:
            self.batch_id = new_id
        else:
            self._unmerged = new_id
            self.backend.merge(self.batch_id, new_id)
            self._unmerged = None
        return outs

    def _account(self, outs: list[TokenOut]) -> None:
        self.generated_tokens += len(outs)
        for out in outs:
            running = self.running[out.req_id]
            running.generated += 1
            if out.finish_reason is not None:  # the backend already freed its KV
                del self.running[out.req_id]
                self.queue.record_finished(running.generated)
        self._reset_if_idle()

    def _drop_aborted(self) -> None:
        gone = self._aborted & self.running.keys()
        self._aborted.clear()
        if not gone:
            return
        for req_id in gone:
            del self.running[req_id]
        self.backend.filter(self.batch_id, list(self.running))
        self._reset_if_idle()

    def _make_room_for_decode(self) -> None:
        """Optimistic admission only: pause the newest requests if the next step would not fit."""
        free = self.max_total_token_num - self.kv_used()
        if free >= len(self.running):
            return
        victims = self.queue.select_requests_to_pause([r.info() for r in self.running.values()], len(self.running) - free)
        paused = self.backend.pause(self.batch_id, victims)
        for req_id in victims:
            del self.running[req_id]
        self.queue.requeue_paused(paused)
        self._reset_if_idle()

    def _reset_if_idle(self) -> None:
        if not self.running and self.batch_id is not None:
            self.backend.remove(self.batch_id)
            self.batch_id = None

    # ---- recovery ----------------------------------------------------------------------------
    def fail_step(self) -> list[int]:
        """After a backend call of `step()` raised: drop the requests it concerned, free their
        KV on the backend, and return their ids (the caller tells their clients).

        No search for the one request at fault. A failed prefill touched only its new batch, so
        the running batch goes on. Any other failed call (decode, filter, pause, merge) may have
        left the running batch half-updated on the backend (decode allocates KV and lengthens
        every sequence before the model runs), so every running request fails with it. If the
        removal raises too, the backend is beyond repair and the error propagates.
        """
        if self._prefilling is not None:
            batch_id, failed = self._prefilling
            self._prefilling = None
            self.backend.remove(batch_id)
            return failed
        failed = list(self.running)
        self.running.clear()
        # A merge that raised may have left the new batch registered on its own (removing a
        # batch the backend no longer has is a no-op).
        for batch_id in (self.batch_id, self._unmerged):
            if batch_id is not None:
                self.backend.remove(batch_id)
        self.batch_id = self._unmerged = None
        return failed
