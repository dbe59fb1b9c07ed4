"""Per-step metadata shared by every layer of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class ForwardState:
    """What one step needs to know beyond the hidden states.

    A step packs the new tokens of every scheduled request back to back, without padding:
    first the decode rows (one token each: row i is token i), then the prefill rows, each a
    chunk of its request's prompt. Prefill row j owns the packed tokens
    `[num_decode + b_start[j], num_decode + b_start[j] + b_new_len[j])`, which sit at positions
    `[b_prefix_len[j], b_prefix_len[j] + b_new_len[j])` of its request: the first
    `b_prefix_len[j]` positions are already in the KV pool (earlier chunks), and the chunk
    attends to them and causally to itself.
    """

    positions: torch.Tensor  # int64 [T], position of each input token in its request
    out_slots: torch.Tensor  # int64 [T], KV slot each input token's K/V is written to
    b_req_idx: torch.Tensor  # int32 [B], row of each scheduled request in req_to_token (decode rows first)
    b_seq_len: torch.Tensor  # int32 [B], tokens the request has in KV after this step
    req_to_token: torch.Tensor
    num_decode: int  # rows [0, num_decode) are decode rows
    max_seq_len: int  # over all rows
    # Prefill rows, host-side (the back ends plan their launches from them without a sync).
    b_start: list[int] = field(default_factory=list)  # offset of each chunk among the prefill tokens
    b_new_len: list[int] = field(default_factory=list)
    b_prefix_len: list[int] = field(default_factory=list)
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

    @property
    def num_prefill(self) -> int:
        return len(self.b_new_len)

    @property
    def decode_max_len(self) -> int:
        """Longest context among the decode rows (0 without decode rows)."""
        if not self.num_decode:
            return 0
        return int(self.b_seq_len[: self.num_decode].max())

    @property
    def has_prefix(self) -> bool:
        """Some prefill row attends to positions computed in an earlier step."""
        return any(self.b_prefix_len)
