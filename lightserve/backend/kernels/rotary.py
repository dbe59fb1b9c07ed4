"""Rotary position embedding applied in place to q and k (the "rotate half" layout of HF Llama).

One launch rotates both tensors: program (t, 0) rotates every query head of token t, program
(t, 1) every key head, so cos/sin of a token are read once per tensor and q/k never leave their
buffers (they are usually strided views into the fused qkv projection output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightserve.backend.kernels.runtime import check_device, next_pow2


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, n_heads, token, cos, sin, half,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (dims[None, :] < half)
    first = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(first, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(first + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
                   n_q_heads, n_k_heads, half,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + token * stride_ct + dims, mask=dims < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * stride_st + dims, mask=dims < half, other=0.0).to(tl.float32)[None, :]
    if tl.program_id(1) == 0:
        _rotate_heads(q_ptr, stride_qt, stride_qh, n_q_heads, token, cos, sin, half, BLOCK_HQ, BLOCK_HALF)
    else:
        _rotate_heads(k_ptr, stride_kt, stride_kh, n_k_heads, token, cos, sin, half, BLOCK_HK, BLOCK_HALF)


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by per-token cos/sin [T, D/2]; returns (q, k).

    q and k may be strided views (e.g. slices of a fused qkv output) as long as the head dim is
    contiguous. The math is fp32 with one rounding to the tensor dtype, like `models.rotary.apply_rotary`.
    """
    check_device(q.device)
    n_tokens, n_q_heads, head_dim = q.shape
    if k.shape[0] != n_tokens or k.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} need the same tokens and an even head dim")
    half = head_dim // 2
    if cos.shape != (n_tokens, half) or sin.shape != (n_tokens, half):
        raise ValueError(f"cos/sin must be [{n_tokens}, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    if n_tokens == 0:
        return q, k
    _rotary_kernel[(n_tokens, 2)](
        q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        n_q_heads, k.shape[1], half,
        BLOCK_HQ=next_pow2(n_q_heads), BLOCK_HK=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(half),
        num_warps=4,
    )
    return q, k
