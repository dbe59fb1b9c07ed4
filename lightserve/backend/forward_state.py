"""Per-step metadata shared by every layer of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class ForwardState:
    """What one prefill or decode step needs to know beyond the hidden states.

    Prefill packs the new tokens of all requests back to back (no padding): request i owns
    rows [b_start[i], b_start[i] + b_new_len[i]). Decode has exactly one new token per request.
    """

    is_prefill: bool
    positions: torch.Tensor  # int64 [T], position of each input token in its request
    out_slots: torch.Tensor  # int64 [T], KV slot each input token's K/V is written to
    b_req_idx: torch.Tensor  # int32 [B], row of each request in req_to_token
    b_seq_len: torch.Tensor  # int32 [B], tokens the request has in KV after this step
    max_seq_len: int
    req_to_token: torch.Tensor
    b_start: list[int] = field(default_factory=list)  # prefill only
    b_new_len: list[int] = field(default_factory=list)  # prefill only
    # Filled once per step: rotary cos/sin of `positions`, and whatever the attention back end
    # precomputes for all layers (e.g. gather indices).
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None
    attn_meta: Any = None
    # Multimodal: embeddings that replace placeholder tokens ([N, hidden], and their rows in the input).
    image_embeds: Optional[torch.Tensor] = None
    image_rows: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.b_req_idx.shape[0])
