"""SiLU-and-multiply of the fused gate/up projection: ``silu(gate) * up`` in one pass.

The torch reference (`F.silu(gate) * up`) rounds twice, after the SiLU and after the product;
the kernel keeps both roundings so half-precision results match it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightserve.backend.kernels.runtime import check_device, next_pow2

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> [..., I]: the first half is the gate, the second half the up projection."""
    check_device(gate_up.device)
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"gate_up's last dim must be even, got {width}")
    n_cols = width // 2
    x = gate_up.reshape(-1, width)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((x.shape[0], n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0] and n_cols:
        block = min(_BLOCK, next_pow2(n_cols))
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n_cols, block))](
            x, out, x.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], n_cols)
