"""The non-attention layer ops in plain PyTorch (any device). Triton versions with the same
semantics live in `backend/kernels/ops.py`; an attention back end names its ops (`.ops`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightserve.backend.models.rotary import apply_rotary


class TorchOps:
    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Same arithmetic as transformers' LlamaRMSNorm: statistics in fp32, scale in model dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
