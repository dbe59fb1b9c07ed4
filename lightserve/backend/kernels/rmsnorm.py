"""RMSNorm with the arithmetic of transformers' LlamaRMSNorm (and of `models.template.rms_norm`).

Statistics in fp32, the normalised row rounded to the input dtype, then scaled by the weight
with one rounding to the output dtype: the same roundings as the torch reference, so fp16/bf16
results match it bit for bit up to the rsqrt implementation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightserve.backend.kernels.runtime import check_device, next_pow2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # Round the normalised row to the input dtype first, as the torch reference does.
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * normalise(x)`` over the last dim of `x` (any leading shape); returns a new tensor."""
    check_device(x.device)
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    block = next_pow2(n_cols)
    # One program per row; wider rows get more warps so each thread holds a few elements.
    num_warps = min(max(block // 512, 1), 16)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight.contiguous(), out, x2.stride(0), out.stride(0), n_cols, eps,
                                     BLOCK=block, num_warps=num_warps)
    return out.view(x.shape)
