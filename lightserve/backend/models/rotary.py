"""Rotary position embedding tables (default, linear and llama3 scaling)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, and the band
    # between is interpolated smoothly.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_medium, interpolated, out)


class RotaryTable:
    """cos/sin per position, [max_pos, head_dim // 2], in float32, grown on demand."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict[str, Any]], max_pos: int, device):
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.device = torch.device(device)
        self._build(max_pos)

    def _build(self, max_pos: int) -> None:
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), self.inv_freq)
        self.cos = freqs.cos().float().to(self.device)
        self.sin = freqs.sin().float().to(self.device)

    def ensure(self, max_pos: int) -> None:
        if max_pos > self.cos.shape[0]:
            self._build(max(max_pos, 2 * self.cos.shape[0]))

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, H, D] by per-token cos/sin [T, D/2] (the "rotate half" layout of HF Llama)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
