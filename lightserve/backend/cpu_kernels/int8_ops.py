"""The passes around a W8A8 matmul in C (`int8_ops.c`), with `backend/quant.py`'s semantics."""

from __future__ import annotations

from typing import Optional

import torch

from lightserve.backend.cpu_kernels import build
from lightserve.backend.cpu_kernels.checks import check_rows

_DTYPES = (torch.float32, torch.bfloat16)


def _check_activations(x: torch.Tensor) -> None:
    check_rows("x", x, 2)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32 or bfloat16, got {x.dtype}")


def _check_vector(name: str, t: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> None:
    if t.device.type != "cpu" or t.dtype != dtype or t.shape != (n,) or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor of shape [{n}], "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """fp32 [M]: max |x[m, :]| of x [M, K] (bf16/fp32, strided rows)."""
    _check_activations(x)
    out = torch.empty(x.shape[0], dtype=torch.float32)
    if x.numel():
        build.require().row_absmax(x.data_ptr(), x.stride(0), int(x.dtype == torch.bfloat16), x.shape[0], x.shape[1],
                                   out.data_ptr(), torch.get_num_threads())
    else:
        out.zero_()
    return out


def quantize_rows(x: torch.Tensor, absmax: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scale [M]), per row; `absmax` [M] replaces the rows' own."""
    _check_activations(x)
    rows, cols = x.shape
    if absmax is not None:
        _check_vector("absmax", absmax, rows)
    q = torch.empty((rows, cols), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    if rows:
        build.require().quantize_rows(x.data_ptr(), x.stride(0), int(x.dtype == torch.bfloat16), rows, cols,
                                      None if absmax is None else absmax.data_ptr(), q.data_ptr(), scale.data_ptr(),
                                      torch.get_num_threads())
    return q, scale


def dequantize_rows(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                    dtype: torch.dtype) -> torch.Tensor:
    """int32 acc [M, N] -> `dtype` [M, N]: (acc * x_scale[m]) * w_scale[n] (+ bias[n], of `dtype`)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    if acc.device.type != "cpu" or acc.dtype != torch.int32 or acc.dim() != 2 or not acc.is_contiguous():
        raise ValueError(f"acc must be a contiguous 2-D int32 CPU tensor, got {acc.dtype} {tuple(acc.shape)}")
    rows, cols = acc.shape
    _check_vector("x_scale", x_scale, rows)
    _check_vector("w_scale", w_scale, cols)
    if bias is not None:
        _check_vector("bias", bias, cols, dtype)
    out = torch.empty((rows, cols), dtype=dtype)
    if out.numel():
        build.require().dequantize_rows(acc.data_ptr(), rows, cols, x_scale.data_ptr(), w_scale.data_ptr(),
                                        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0),
                                        int(dtype == torch.bfloat16), torch.get_num_threads())
    return out
