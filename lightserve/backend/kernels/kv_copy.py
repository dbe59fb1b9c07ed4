"""Scatter the K/V of new tokens into their TokenAttention pool slots (one launch for both).

Equivalent to ``k_cache.index_copy_(0, slots, k); v_cache.index_copy_(0, slots, v)``, but k and
v may be strided views of the fused qkv output (no ``.contiguous()`` copy first).

An int8 pool (`mem_manager.LayerKV` with scales) gets each (token, head) row quantized in the
same launch, bit for bit as `mem_manager.quantize_kv` does it: int8 values and the row's fp32
scale are stored at the slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightserve.backend.kernels.runtime import check_device, next_pow2

# 1.5 * 2**23: an fp32 of magnitude below 2**22 plus this has no fraction bits left, so the add
# rounds to an integer the IEEE way (half to even), and subtracting it back is exact. Triton has
# no round-half-even that also runs in the interpreter (libdevice.rint is CUDA only).
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize_rows(x):
    """x fp32 [H, D] (masked lanes 0) -> (int8 [H, D], fp32 scale [H]), as `quantize_kv`."""
    absmax = tl.max(tl.abs(x), axis=1)
    nonzero = absmax > 0
    # IEEE division as the reference's tensor / tensor (a plain `/` may be approximate on CUDA).
    inv = tl.where(nonzero, tl.math.div_rn(127.0, tl.where(nonzero, absmax, 1.0)), 0.0)
    # Clamping before rounding gives the same integers (the bounds are integers) and keeps the
    # product away from the add below, which CUDA could otherwise fuse into an FMA that skips
    # the product's rounding.
    y = tl.minimum(tl.maximum(x * inv[:, None], -127.0), 127.0)
    q = (y + _RNE_MAGIC) - _RNE_MAGIC
    return q.to(tl.int8), tl.math.div_rn(absmax, 127.0)


@triton.jit
def _kv_copy_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, k_scale_ptr, v_scale_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kct, stride_kch, stride_vct, stride_vch,
                    stride_kst, stride_ksh, stride_vst, stride_vsh,
                    n_heads, head_dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANTIZED: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < head_dim)
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if QUANTIZED:
        # Masked lanes load as 0 and so never raise a row's absmax.
        k, k_row_scale = _quantize_rows(tl.where(mask, k.to(tl.float32), 0.0))
        v, v_row_scale = _quantize_rows(tl.where(mask, v.to(tl.float32), 0.0))
        row = tl.arange(0, BLOCK_H)
        tl.store(k_scale_ptr + slot * stride_kst + row * stride_ksh, k_row_scale, mask=row < n_heads)
        tl.store(v_scale_ptr + slot * stride_vst + row * stride_vsh, v_row_scale, mask=row < n_heads)
    tl.store(k_cache_ptr + slot * stride_kct + heads * stride_kch + dims, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_vct + heads * stride_vch + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write k/v [T, H, D] into k_cache/v_cache [S, H, D] at rows `slots` [T] (int32 or int64).

    An int8 pool (with k_scale/v_scale [S, H] fp32) gets them quantized as `mem_manager.quantize_kv`
    does: per (token, head) row, scale = absmax / 127 and int8 = round-half-even(x * 127 / absmax).
    """
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
    quantized = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    if n_tokens == 0:
        return
    # A float pool has no scales: the kernel compiles without the quantizing branch and never
    # touches these arguments, so the cache stands in for the pointers.
    k_scale, v_scale = (k_scale, v_scale) if quantized else (k_cache, v_cache)
    _kv_copy_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slots.contiguous(), k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
        n_heads, head_dim, BLOCK_H=next_pow2(n_heads), BLOCK_D=next_pow2(head_dim), QUANTIZED=quantized,
        num_warps=4,
    )


def check_kv_scales(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> bool:
    """Whether the pool is int8 with scales. Raises ValueError unless an int8 pool comes with
    both scales, fp32 [S, Hkv], and a float pool with neither."""
    int8 = k_cache.dtype == torch.int8 or v_cache.dtype == torch.int8
    if k_scale is None and v_scale is None and not int8:
        return False
    if k_scale is None or v_scale is None or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"an int8 KV pool needs int8 k and v and both scales; got k {k_cache.dtype}, "
                         f"v {v_cache.dtype}, k_scale {k_scale is not None}, v_scale {v_scale is not None}")
    if not int8:
        raise ValueError(f"KV scales go with an int8 pool, got a {k_cache.dtype} one")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.dtype != torch.float32 or t.shape != k_cache.shape[:2]:
            raise ValueError(f"{name} must be float32 {tuple(k_cache.shape[:2])}, got {t.dtype} {tuple(t.shape)}")
    return True
