"""Argument checks shared by the C kernels' wrappers: the kernels trust their pointers."""

from __future__ import annotations

from typing import Optional

import torch


def check_rows(name: str, t: torch.Tensor, ndim: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> None:
    """`t` is a CPU tensor (of `ndim` dims and `dtype` when given) whose dims after the first
    are contiguous; the row stride is free (a view into a fused projection is fine)."""
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size > 1 and stride != expected:
            raise ValueError(f"{name} must have contiguous inner dims, got shape {tuple(t.shape)} strides {t.stride()}")
        expected *= size
