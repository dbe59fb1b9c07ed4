"""Attention back ends behind one interface.

A back end gets the per-layer q (and, in prefill, k/v of the new tokens) and the KV pool, and
returns the attention output. `begin_step` runs once per forward pass so that work common to
all layers (gather indices, masks) is not repeated per layer.

A step mixes decode rows (one new token each) and prefill chunks (`ForwardState`);
`MixedStepAttention.forward` sends each kind to the back end's `decode` or `prefill`. A chunk
that continues a prompt attends to the positions earlier steps put in the pool, read through the
token table, as well as causally to itself.

- `torch`: plain PyTorch, works on any device. Decode gathers K/V through the token table.
- `cpu_native`: C kernels (see `cpu_kernels`): decode reads K/V through the token table in
  place; bf16 prefill attention uses AVX512-BF16 dot products where the CPU has them (else as
  `torch`); the layer's small ops (RMSNorm, rotary, SiLU, KV write) are one call each. Chosen
  by `auto` on CPU when the kernels compile.
- `triton`: Triton kernels; chosen by `auto` on CUDA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lightserve.backend.forward_state import ForwardState
from lightserve.backend.mem_manager import LayerKV
from lightserve.backend.models.torch_ops import TorchOps

logger = logging.getLogger(__name__)


class MixedStepAttention:
    """Splits a step's rows between the back end's decode and prefill paths.

    The step packs its decode rows first (one token each), then its prefill chunks
    (`ForwardState`); the projections around attention ran over all of them at once.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV,
                state: ForwardState) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the step's tokens; their K/V are already in `kv`."""
        nd = state.num_decode
        if not state.num_prefill:
            return self.decode(q, kv, state)
        if not nd:
            return self.prefill(q, k, v, state, kv)
        return torch.cat([self.decode(q[:nd], kv, state), self.prefill(q[nd:], k[nd:], v[nd:], state, kv)])


@dataclass
class _TorchMeta:
    """What every layer's attention of one step reuses (torch back end)."""

    # Decode rows: the slots of every request padded to the longest context, and the mask of
    # real positions.
    decode_slots: Optional[torch.Tensor] = None
    decode_mask: Optional[torch.Tensor] = None
    decode_len: int = 0
    # Prefill rows with a prefix in the pool: row -> (slots of positions [0, seq_len), mask [n, seq_len]).
    prefix_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class TorchAttention(MixedStepAttention):
    name = "torch"
    ops = TorchOps

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def begin_step(self, state: ForwardState) -> None:
        state.attn_meta = meta = _TorchMeta()
        if state.num_decode:
            self._plan_decode_gather(state, meta)
        self._plan_prefix_rows(state, meta)

    @staticmethod
    def _plan_decode_gather(state: ForwardState, meta: _TorchMeta) -> None:
        nd = state.num_decode
        meta.decode_len = max_len = state.decode_max_len
        slots = state.req_to_token.index_select(0, state.b_req_idx[:nd].long())[:, :max_len].long()
        valid = torch.arange(max_len, device=slots.device)[None, :] < state.b_seq_len[:nd, None]
        # Padding positions point to slot 0; their scores are masked out.
        meta.decode_slots = slots.masked_fill(~valid, 0).reshape(-1)
        meta.decode_mask = valid[:, None, None, :]

    @staticmethod
    def _plan_prefix_rows(state: ForwardState, meta: _TorchMeta) -> None:
        nd = state.num_decode
        for j, (prefix, n) in enumerate(zip(state.b_prefix_len, state.b_new_len)):
            if prefix:
                total = prefix + n
                slots = state.req_to_token[int(state.b_req_idx[nd + j]), :total].long()
                # The chunk's query at position prefix + i sees positions <= prefix + i.
                mask = torch.arange(total, device=slots.device)[None, :] <= (
                    prefix + torch.arange(n, device=slots.device))[:, None]
                meta.prefix_rows[j] = (slots, mask)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ForwardState,
                kv: LayerKV) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the prefill rows' new tokens (K/V already in the pool)."""
        out = torch.empty_like(q)
        self._prefill_rows(q, k, v, state, kv, out, range(state.num_prefill))
        return out

    def _prefill_rows(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ForwardState,
                      kv: LayerKV, out: torch.Tensor, rows) -> None:
        """Attention of prefill rows `rows` into `out`. A chunk without a prefix attends its own
        new k/v; one with a prefix reads every position through the token table (dequantized from
        an int8 pool; a chunk's own new tokens are then read back quantized too, as a later chunk
        would read them)."""
        meta: _TorchMeta = state.attn_meta
        for j in rows:
            start, n = state.b_start[j], state.b_new_len[j]
            qi = q[start : start + n].transpose(0, 1).unsqueeze(0)
            if j in meta.prefix_rows:
                slots, mask = meta.prefix_rows[j]
                ki, vi = (t.transpose(0, 1).unsqueeze(0) for t in kv.gather(slots, q.dtype))
                oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale, enable_gqa=True)
            else:
                ki = k[start : start + n].transpose(0, 1).unsqueeze(0)
                vi = v[start : start + n].transpose(0, 1).unsqueeze(0)
                oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.scale, enable_gqa=True)
            out[start : start + n] = oi[0].transpose(0, 1)

    def decode(self, q: torch.Tensor, kv: LayerKV, state: ForwardState) -> torch.Tensor:
        """q [B, Hq, D] of the decode rows' one new token each; K/V read through the token table."""
        meta: _TorchMeta = state.attn_meta
        batch, max_len = q.shape[0], meta.decode_len
        k, v = (t.view(batch, max_len, self.num_kv_heads, self.head_dim) for t in kv.gather(meta.decode_slots, q.dtype))
        # Fold the query heads of one KV group into the query length: one matmul per KV head.
        qg = q.reshape(batch, self.num_kv_heads, self.group, self.head_dim)
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.decode_mask,
                                           scale=self.scale)
        return o.reshape(batch, self.num_heads, self.head_dim)


class CpuNativeAttention(TorchAttention):
    name = "cpu_native"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(num_heads, num_kv_heads, head_dim)
        from lightserve.backend import cpu_kernels

        self._kernels = cpu_kernels
        self.ops = cpu_kernels.CpuOps  # the small layer ops in C too
        # bf16 prefill in C: on AVX512-BF16 CPUs, for the head shapes the kernel takes.
        self._c_prefill = (cpu_kernels.context_attention_supported()
                           and cpu_kernels.context_attention_fits(num_heads, num_kv_heads, head_dim))

    def begin_step(self, state: ForwardState) -> None:
        # Decode reads the pool in place (nothing to plan); prefill rows with a prefix use the
        # torch path, whose per-row gathers are planned here.
        state.attn_meta = meta = _TorchMeta()
        self._plan_prefix_rows(state, meta)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ForwardState,
                kv: LayerKV) -> torch.Tensor:
        if not (self._c_prefill and q.dtype == torch.bfloat16):
            return super().prefill(q, k, v, state, kv)
        # The C kernel takes the chunks that start a request (no prefix); the others read their
        # prefix through the token table in torch.
        meta: _TorchMeta = state.attn_meta
        fresh = [j for j in range(state.num_prefill) if j not in meta.prefix_rows]
        if fresh:
            out = self._kernels.context_attention(
                q, k, v, torch.tensor([state.b_start[j] for j in fresh], dtype=torch.int64),
                torch.tensor([state.b_new_len[j] for j in fresh], dtype=torch.int64), self.scale)
        else:
            out = torch.empty_like(q)
        self._prefill_rows(q, k, v, state, kv, out, meta.prefix_rows)
        return out

    def decode(self, q: torch.Tensor, kv: LayerKV, state: ForwardState) -> torch.Tensor:
        nd = state.num_decode
        return self._kernels.token_decode_attention(
            q, kv.k, kv.v, state.req_to_token, state.b_req_idx[:nd], state.b_seq_len[:nd], self.scale,
            k_scale=kv.k_scale, v_scale=kv.v_scale,
        )


def _cpu_native_available() -> bool:
    try:
        from lightserve.backend import cpu_kernels
    except ImportError:
        return False
    return cpu_kernels.available()


def _make_triton(num_heads: int, num_kv_heads: int, head_dim: int):
    from lightserve.backend.kernels.triton_attention import TritonAttention

    return TritonAttention(num_heads, num_kv_heads, head_dim)


ATTENTION_BACKENDS: dict[str, Callable] = {
    "torch": TorchAttention,
    "cpu_native": CpuNativeAttention,
    "triton": _make_triton,
}


def resolve_backend_name(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map `auto` to the best back end for the device; validate explicit names."""
    if name == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _cpu_native_available():
            return "cpu_native"
        return "torch"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention back end {name!r}; choose one of auto, {', '.join(ATTENTION_BACKENDS)}")
    if name == "cpu_native" and not _cpu_native_available():
        raise RuntimeError("attention back end cpu_native needs the C kernel, which failed to build (see the log)")
    return name


def make_attention(name: str, num_heads: int, num_kv_heads: int, head_dim: int):
    return ATTENTION_BACKENDS[name](num_heads, num_kv_heads, head_dim)
