"""The non-attention layer ops in plain PyTorch (any device). Triton versions with the same
semantics live in `backend/kernels/ops.py`; an attention back end names its ops (`.ops`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightserve.backend.mem_manager import LayerKV, quantize_kv
from lightserve.backend.models.rotary import apply_rotary


class TorchOps:
    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm: statistics in fp32, scale in model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    @classmethod
    def add_rms_norm(cls, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add, then RMSNorm of the sum: returns (hidden, normed). `hidden` is
        updated in place (it is the layer's own residual stream; nobody else holds it)."""
        hidden += delta
        return hidden, cls.rms_norm(hidden, weight, eps)

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qk = adjacent_heads(q, k)
        if qk is None:
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # q and k are neighbouring head ranges of one fused qkv row: rotate them in one pass
        # (half the small ops per layer, which dominate decode time outside the matmuls).
        out = apply_rotary(qk, cos, sin)
        return out[:, : q.shape[1]], out[:, q.shape[1]:]

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def write_kv(kv: LayerKV, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The new tokens' k/v [T, Hkv, D] into the pool at `slots` (quantized for an int8 pool)."""
        if kv.quantized:
            (k, k_scale), (v, v_scale) = quantize_kv(k), quantize_kv(v)
            kv.k_scale.index_copy_(0, slots, k_scale)
            kv.v_scale.index_copy_(0, slots, v_scale)
        kv.k.index_copy_(0, slots, k)
        kv.v.index_copy_(0, slots, v)


def adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A [T, Hq + Hk, D] view over q and k when k's heads directly follow q's in memory."""
    if q.dim() != 3 or q.stride()[1:] != k.stride()[1:] or q.stride(0) != k.stride(0) or q.shape[2] != k.shape[2]:
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
