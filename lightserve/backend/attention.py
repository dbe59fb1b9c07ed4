"""Attention back ends behind one interface.

A back end gets the per-layer q (and, in prefill, k/v of the new tokens) and the KV pool, and
returns the attention output. `begin_step` runs once per forward pass so that work common to
all layers (gather indices, masks) is not repeated per layer.

- `torch`: plain PyTorch, works on any device. Decode gathers K/V through the token table.
- `cpu_native`: C kernels (see `cpu_kernels`): decode reads K/V through the token table in
  place; bf16 prefill attention uses AVX512-BF16 dot products where the CPU has them (else as
  `torch`); the layer's small ops (RMSNorm, rotary, SiLU, KV write) are one call each. Chosen
  by `auto` on CPU when the kernels compile.
- `triton`: Triton kernels; chosen by `auto` on CUDA.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from lightserve.backend.forward_state import ForwardState
from lightserve.backend.models.torch_ops import TorchOps

logger = logging.getLogger(__name__)


class TorchAttention:
    name = "torch"
    ops = TorchOps

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def begin_step(self, state: ForwardState) -> None:
        if state.is_prefill:
            return
        # Decode: the slots of every request padded to the longest context, and the mask of
        # real positions; computed once, used by all layers.
        max_len = state.max_seq_len
        slots = state.req_to_token.index_select(0, state.b_req_idx.long())[:, :max_len].long()
        valid = torch.arange(max_len, device=slots.device)[None, :] < state.b_seq_len[:, None]
        # Padding positions point to slot 0; their scores are masked out.
        slots = slots.masked_fill(~valid, 0)
        state.attn_meta = (slots.reshape(-1), valid[:, None, None, :])

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ForwardState, kv_cache=None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens; causal within each request.

        Requests start at position 0 here (no cached prefix), so the new k/v are all there is
        to attend to and `kv_cache` is not read."""
        out = torch.empty_like(q)
        for start, n in zip(state.b_start, state.b_new_len):
            qi = q[start : start + n].transpose(0, 1).unsqueeze(0)
            ki = k[start : start + n].transpose(0, 1).unsqueeze(0)
            vi = v[start : start + n].transpose(0, 1).unsqueeze(0)
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.scale, enable_gqa=True)
            out[start : start + n] = oi[0].transpose(0, 1)
        return out

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, state: ForwardState) -> torch.Tensor:
        """q [B, Hq, D] of the one new token per request; K/V read through the token table."""
        flat_slots, mask = state.attn_meta
        batch, max_len = state.batch_size, state.max_seq_len
        k = k_cache.index_select(0, flat_slots).view(batch, max_len, self.num_kv_heads, self.head_dim)
        v = v_cache.index_select(0, flat_slots).view(batch, max_len, self.num_kv_heads, self.head_dim)
        # Fold the query heads of one KV group into the query length: one matmul per KV head.
        qg = q.view(batch, self.num_kv_heads, self.group, self.head_dim)
        o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=self.scale)
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
        if state.is_prefill and self._c_prefill:  # the requests' token ranges, once for all layers
            state.attn_meta = (torch.tensor(state.b_start, dtype=torch.int64),
                               torch.tensor(state.b_new_len, dtype=torch.int64))

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ForwardState, kv_cache=None) -> torch.Tensor:
        if self._c_prefill and q.dtype == torch.bfloat16:
            return self._kernels.context_attention(q, k, v, *state.attn_meta, self.scale)
        return super().prefill(q, k, v, state, kv_cache)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, state: ForwardState) -> torch.Tensor:
        return self._kernels.token_decode_attention(
            q, k_cache, v_cache, state.req_to_token, state.b_req_idx, state.b_seq_len, self.scale
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
