"""The `triton` attention back end: token-attention decode and context attention kernels.

Same interface as `attention.TorchAttention`. `begin_step` prepares, once per forward pass, what
every layer's launch needs (the decode split plan and its scratch buffers; the prefill row
offsets), so the per-layer calls are kernel launches only.

Prefill reads K/V through the token table when the layer passes its pool
(``prefill(q, k, v, state, kv_cache=(k_cache, v_cache))``, K/V already written): that also covers
a prefix already in the pool. Without the pool it attends the packed new k/v directly, which is
only valid when the requests have no prefix (checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lightserve.backend.forward_state import ForwardState
from lightserve.backend.kernels.context_attention import context_attention, packed_table
from lightserve.backend.kernels.ops import TritonOps
from lightserve.backend.kernels.runtime import check_device
from lightserve.backend.kernels.token_attention_decode import DecodePlan, plan_decode, token_attention_decode


@dataclass
class PrefillPlan:
    """Per-step prefill metadata on the device, shared by all layers."""

    b_new_len: torch.Tensor  # int32 [B]
    b_q_start: torch.Tensor  # int32 [B], first packed row of each request
    max_new_len: int
    has_prefix: bool  # some request already had positions in the pool before this step
    packed_rows: torch.Tensor  # int32 [B] = arange: row i of `packed_table` belongs to request i
    packed_table: torch.Tensor  # int32 [B, max_new_len]: position -> packed row of the new k/v


class TritonAttention:
    name = "triton"
    ops = TritonOps  # the layer template runs norms, rotary, SiLU-mul and the KV write on Triton too

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        # Fail at model construction, not at the first request, on a machine that cannot launch.
        check_device()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5
        # Tests set this to force several decode splits on short contexts; None = automatic.
        self.split_len: Optional[int] = None

    def begin_step(self, state: ForwardState) -> None:
        device = state.req_to_token.device
        check_device(device)
        if not state.is_prefill:
            state.attn_meta = plan_decode(state.batch_size, self.num_heads, self.num_kv_heads, self.head_dim,
                                          state.max_seq_len, device, self.split_len)
            return
        new_len = torch.tensor(state.b_new_len, dtype=torch.int32, device=device)
        q_start = torch.tensor(state.b_start, dtype=torch.int32, device=device)
        max_new = max(state.b_new_len, default=0)
        state.attn_meta = PrefillPlan(
            b_new_len=new_len,
            b_q_start=q_start,
            max_new_len=max_new,
            has_prefix=bool((state.b_seq_len.to(torch.int32) != new_len).any()),
            packed_rows=torch.arange(len(state.b_new_len), dtype=torch.int32, device=device),
            packed_table=packed_table(q_start, max_new),
        )

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ForwardState,
                kv_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens; causal within each request.

        With `kv_cache` (the layer's pool, new K/V already written), K/V of every position are read
        through ``state.req_to_token``; otherwise the packed k/v are attended directly.
        """
        plan: PrefillPlan = state.attn_meta
        if kv_cache is not None:
            return context_attention(q, kv_cache[0], kv_cache[1], state.req_to_token, state.b_req_idx,
                                     state.b_seq_len, plan.b_new_len, plan.b_q_start, plan.max_new_len, self.scale)
        if plan.has_prefix:
            raise ValueError("prefill of requests with a prefix in the KV pool needs kv_cache=(k_cache, v_cache)")
        return context_attention(q, k, v, plan.packed_table, plan.packed_rows, plan.b_new_len, plan.b_new_len,
                                 plan.b_q_start, plan.max_new_len, self.scale)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               state: ForwardState) -> torch.Tensor:
        """q [B, Hq, D] of the one new token per request; K/V read through the token table in place."""
        plan: DecodePlan = state.attn_meta
        return token_attention_decode(q, k_cache, v_cache, state.req_to_token, state.b_req_idx, state.b_seq_len,
                                      plan, self.scale)
