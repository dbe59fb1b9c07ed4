"""Scatter the K/V of new tokens into their TokenAttention pool slots (one launch for both).

Equivalent to ``k_cache.index_copy_(0, slots, k); v_cache.index_copy_(0, slots, v)``, but k and
v may be strided views of the fused qkv output (no ``.contiguous()`` copy first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightserve.backend.kernels.runtime import check_device, next_pow2


@triton.jit
def _kv_copy_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kct, stride_kch, stride_vct, stride_vch,
                    n_heads, head_dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < head_dim)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    tl.store(k_cache_ptr + slot * stride_kct + heads * stride_kch + dims, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_vct + heads * stride_vch + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write k/v [T, H, D] into k_cache/v_cache [S, H, D] at rows `slots` [T] (int32 or int64).
    An int8 pool (with k_scale/v_scale [S, H] fp32) gets them quantized as `mem_manager.quantize_kv` does."""
    if k_scale is not None or v_scale is not None:
        raise NotImplementedError("int8 KV write in Triton")
    check_device(k.device)
    n_tokens, n_heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[1:] != k.shape[1:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not match: k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if slots.shape != (n_tokens,):
        raise ValueError(f"slots must be [{n_tokens}], got {tuple(slots.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    if n_tokens == 0:
        return
    _kv_copy_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slots.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        n_heads, head_dim, BLOCK_H=next_pow2(n_heads), BLOCK_D=next_pow2(head_dim), num_warps=4,
    )
