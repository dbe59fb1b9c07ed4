"""The state of one running batch on a backend rank.

Per-request facts that the hot loop reads every step live in batch tensors (rows in batch
order), so a decode step touches no Python object per request until the outputs are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightserve.backend.sampling import SamplingBatch
from lightserve.io_struct import ImageItem, SamplingParams


@dataclass
class ReqState:
    req_id: int
    row: int  # row of req_to_token
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    output_ids: list[int] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    images: list[ImageItem] = field(default_factory=list)  # kept so a paused request is recomputed with them


@dataclass
class InferBatch:
    batch_id: int
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

    def select(self, keep: list[int]) -> "InferBatch":
        """The batch restricted to rows `keep` (in that order)."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.b_req_idx.device)
        return InferBatch(
            batch_id=self.batch_id,
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
    def concat(a: "InferBatch", b: "InferBatch") -> "InferBatch":
        return InferBatch(
            batch_id=a.batch_id,
            reqs=a.reqs + b.reqs,
            b_req_idx=torch.cat([a.b_req_idx, b.b_req_idx]),
            b_seq_len=torch.cat([a.b_seq_len, b.b_seq_len]),
            last_ids=torch.cat([a.last_ids, b.last_ids]),
            steps=torch.cat([a.steps, b.steps]),
            max_new=torch.cat([a.max_new, b.max_new]),
            check_eos=torch.cat([a.check_eos, b.check_eos]),
            sampling=SamplingBatch.merge(a.sampling, b.sampling),
        )
