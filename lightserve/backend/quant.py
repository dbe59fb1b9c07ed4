"""Symmetric int8 quantization: the reference arithmetic every kernel reproduces.

One scale per row of the last dimension (a token's activations, a weight's output channel, a
token's head of K or V): scale = absmax / 127 and q = round-half-even(x * (127 / absmax)), all
in fp32; an all-zero row has scale 0 and q 0. The C kernels (`cpu_kernels`) and the Triton ones
compute the same fp32 operations in the same order, so they agree with these functions bit for
bit (tests hold them to it).

A W8A8 matmul is then exact integer arithmetic between two such tensors, dequantized once:
y[m, n] = (float(acc[m, n]) * x_scale[m]) * w_scale[n] (+ bias[n]), rounded to the model dtype.
"""

from __future__ import annotations

from typing import Optional

import torch


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """fp32 max |x| over the last dimension."""
    return x.float().abs().amax(dim=-1)


def quantize_symmetric(x: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 [..., K], fp32 scale [...]).

    `absmax` (fp32 [...]) may be given when it spans more than `x` holds: a tensor-parallel
    rank's slice of a row is quantized with the whole row's absmax, so that every rank and tp=1
    agree on the scale.
    """
    xf = x.float()
    if absmax is None:
        absmax = xf.abs().amax(dim=-1)
    # A tensor divided into a scalar is not correctly rounded in torch (it multiplies by a
    # reciprocal); tensor / tensor is IEEE division, as the kernels' 127.0f / absmax.
    inv = torch.where(absmax > 0, torch.full_like(absmax, 127.0) / absmax, torch.zeros_like(absmax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, absmax / 127.0


def dequantize_acc(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
    """int32 [M, N] products of int8 rows -> `dtype` [M, N]: (acc * x_scale[m]) * w_scale[n] + bias[n]."""
    y = acc.float() * x_scale.unsqueeze(-1) * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)
