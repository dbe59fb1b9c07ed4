"""The `triton` attention back end: token-attention decode and context attention kernels.

Same interface as `attention.TorchAttention`. `begin_step` prepares, once per forward pass, what
every layer's launch needs (the decode split plan and its scratch buffers; the prefill row
offsets), so the per-layer calls are kernel launches only.

Prefill reads K/V through the token table from the layer's pool (K/V already written), so a chunk
whose prompt began in an earlier step attends to that prefix like to its new tokens.

An int8 pool (`LayerKV` with scales) is written quantized by `TritonOps.write_kv` and read by
both kernels as int8 with its per-slot, per-head scales; every prefill chunk, a fresh prompt's
too, attends the quantized values it reads back (the torch back end attends a fresh prompt's
unquantized k/v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lightserve.backend.forward_state import ForwardState
from lightserve.backend.mem_manager import LayerKV
from lightserve.backend.attention import MixedStepAttention
from lightserve.backend.kernels.context_attention import context_attention
from lightserve.backend.kernels.ops import TritonOps
from lightserve.backend.kernels.runtime import check_device
from lightserve.backend.kernels.token_attention_decode import DecodePlan, plan_decode, token_attention_decode


@dataclass
class PrefillPlan:
    """Per-step metadata of the prefill rows on the device, shared by all layers."""

    b_req_idx: torch.Tensor  # int32 [P], table row of each prefill row
    b_seq_len: torch.Tensor  # int32 [P], positions in the pool after this step
    b_new_len: torch.Tensor  # int32 [P]
    b_q_start: torch.Tensor  # int32 [P], first packed row of each chunk among the prefill tokens
    max_new_len: int


@dataclass
class StepPlan:
    decode: Optional[DecodePlan] = None
    prefill: Optional[PrefillPlan] = None


class TritonAttention(MixedStepAttention):
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
        plan = StepPlan()
        nd = state.num_decode
        if nd:
            plan.decode = plan_decode(nd, self.num_heads, self.num_kv_heads, self.head_dim, state.decode_max_len,
                                      device, self.split_len)
        if state.num_prefill:
            plan.prefill = PrefillPlan(
                b_req_idx=state.b_req_idx[nd:].to(torch.int32),
                b_seq_len=state.b_seq_len[nd:].to(torch.int32),
                b_new_len=torch.tensor(state.b_new_len, dtype=torch.int32, device=device),
                b_q_start=torch.tensor(state.b_start, dtype=torch.int32, device=device),
                max_new_len=max(state.b_new_len),
            )
        state.attn_meta = plan

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ForwardState,
                kv: LayerKV) -> torch.Tensor:
        """q [T, Hq, D] of the prefill rows' new tokens; K/V of every position (a prefix from
        earlier steps and the new tokens, already written) read through ``state.req_to_token``."""
        plan: PrefillPlan = state.attn_meta.prefill
        return context_attention(q, kv.k, kv.v, state.req_to_token, plan.b_req_idx, plan.b_seq_len,
                                 plan.b_new_len, plan.b_q_start, plan.max_new_len, self.scale,
                                 k_scale=kv.k_scale, v_scale=kv.v_scale)

    def decode(self, q: torch.Tensor, kv: LayerKV, state: ForwardState) -> torch.Tensor:
        """q [B, Hq, D] of the decode rows' one new token each; K/V read through the token table in place."""
        nd = state.num_decode
        return token_attention_decode(q, kv.k, kv.v, state.req_to_token, state.b_req_idx[:nd],
                                      state.b_seq_len[:nd], state.attn_meta.decode, self.scale,
                                      k_scale=kv.k_scale, v_scale=kv.v_scale)
