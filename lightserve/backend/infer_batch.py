"""The requests a backend rank holds: their prompt progress and the decoding batch.

Per-request facts that the hot loop reads every step live in batch tensors (rows in batch
order), so a decode step touches no Python object per request until the outputs are built.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from lightserve.backend.sampling import SamplingBatch
from lightserve.io_struct import ImageItem, PromptLogprobs, SamplingParams
from lightserve.prefix_cache.cache import NO_HOLD, Hold


@dataclass
class ReqState:
    req_id: int
    row: int  # row of req_to_token
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    images: list[ImageItem] = field(default_factory=list)
    # While the prompt is being computed: the tokens to compute (prompt, then the output of a
    # paused request being recomputed) and how many of them are in the KV pool.
    input_ids: list[int] = field(default_factory=list)
    computed: int = 0
    # The prefix cache's key of the prompt (`prefix_cache.cache_key`), the request's lock on its
    # tokens in the cache (its first `hold.length` slots are the cache's), and how many prompt
    # tokens it found cached when it was admitted (reported to the client).
    prompt_key: list[Hashable] = field(default_factory=list)
    hold: Hold = NO_HOLD
    cached_tokens: int = 0
    # Structured output: the request's grammar matcher (`sampling.grammar`), None without one.
    grammar: Optional[Any] = None
    # Prompt scoring (`sampling.prompt_logprobs`, on a first admission): the scores of the chunks
    # computed so far, sent with the first token; None when not scored or already sent.
    prompt_scores: Optional[PromptLogprobs] = None

    @property
    def prompt_done(self) -> bool:
        return self.computed == len(self.input_ids)

    def key(self, n: int) -> list[Hashable]:
        """The cache key of the request's first `n` tokens (prompt, then output)."""
        if n <= len(self.prompt_key):
            return self.prompt_key[:n]
        return self.prompt_key + self.output_ids[: n - len(self.prompt_key)]


@dataclass
class InferBatch:
    """The requests whose prompt is in the pool: each step feeds their last sampled token."""

    reqs: list[ReqState]
    b_req_idx: torch.Tensor  # int32 [B]
    b_seq_len: torch.Tensor  # int32 [B], tokens held in KV
    last_ids: torch.Tensor  # int64 [B], the sampled token to feed next step (not yet in KV)
    steps: torch.Tensor  # int64 [B], tokens generated so far
    max_new: torch.Tensor  # int64 [B]
    check_eos: torch.Tensor  # bool [B], False when the request ignores EOS
    sampling: SamplingBatch

    def __len__(self) -> int:
        return len(self.reqs)

    @classmethod
    def build(cls, reqs: list[ReqState], vocab_size: int, device: torch.device) -> "InferBatch":
        """Rows for requests whose prompt has just been computed."""
        return cls(
            reqs=reqs,
            b_req_idx=torch.tensor([r.row for r in reqs], dtype=torch.int32, device=device),
            b_seq_len=torch.tensor([r.computed for r in reqs], dtype=torch.int32, device=device),
            last_ids=torch.zeros(len(reqs), dtype=torch.long, device=device),
            steps=torch.tensor([len(r.output_ids) for r in reqs], dtype=torch.long, device=device),
            max_new=torch.tensor([r.sampling.max_new_tokens for r in reqs], dtype=torch.long, device=device),
            check_eos=torch.tensor([not r.sampling.ignore_eos for r in reqs], dtype=torch.bool, device=device),
            sampling=SamplingBatch.build([r.sampling for r in reqs], [r.seed for r in reqs],
                                         [r.prompt_ids for r in reqs], vocab_size, device,
                                         output_ids=[r.output_ids for r in reqs]),
        )

    def select(self, keep: list[int]) -> "InferBatch":
        """The batch restricted to rows `keep` (in that order)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.b_req_idx.device)
        return InferBatch(
            reqs=[self.reqs[i] for i in keep],
            b_req_idx=self.b_req_idx.index_select(0, idx),
            b_seq_len=self.b_seq_len.index_select(0, idx),
            last_ids=self.last_ids.index_select(0, idx),
            steps=self.steps.index_select(0, idx),
            max_new=self.max_new.index_select(0, idx),
            check_eos=self.check_eos.index_select(0, idx),
            sampling=self.sampling.filter(idx),
        )

    @staticmethod
    def concat(a: Optional["InferBatch"], b: Optional["InferBatch"]) -> Optional["InferBatch"]:
        """Rows of `a` then rows of `b` (either may be missing)."""
        if a is None or b is None:
            return a if b is None else b
        return InferBatch(
            reqs=a.reqs + b.reqs,
            b_req_idx=torch.cat([a.b_req_idx, b.b_req_idx]),
            b_seq_len=torch.cat([a.b_seq_len, b.b_seq_len]),
            last_ids=torch.cat([a.last_ids, b.last_ids]),
            steps=torch.cat([a.steps, b.steps]),
            max_new=torch.cat([a.max_new, b.max_new]),
            check_eos=torch.cat([a.check_eos, b.check_eos]),
            sampling=SamplingBatch.merge(a.sampling, b.sampling),
        )
