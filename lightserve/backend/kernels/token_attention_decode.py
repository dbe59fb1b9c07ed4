"""Decode attention that reads K/V through the token table in place ("flash decoding").

Each request has one new query token per head. Its K/V are scattered over the TokenAttention pool;
``req_to_token[b_req_idx[b], j]`` is the pool slot of position j. Two launches:

1. ``_decode_split_kernel``, grid (batch, kv_heads, splits): one program takes one KV head of one
   request and a contiguous range of `split_len` positions, and attends all the query heads that
   share the KV head at once (GQA: K/V are read once for the whole group, never copied or
   repeated). It runs an online softmax over blocks of positions and writes the partial output,
   already normalised, plus its log-sum-exp.
2. ``_decode_reduce_kernel``, grid (batch, q_heads): merges the partials of the request's splits.

Splitting the sequence keeps the GPU busy when batch * kv_heads is small (one long request would
otherwise run on a handful of SMs); with a big batch `plan_decode` picks a single split.

An int8 pool (value = int8 * scale, one fp32 scale per slot and KV head) runs the same algorithm:
the int8 K/V tiles are converted to the query's dot dtype (exact: |int8| <= 127), each position's
K scale multiplies its column of scores and its V scale its column of probabilities before P @ V,
so no tile is dequantized element by element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightserve.backend.kernels.kv_copy import check_kv_scales
from lightserve.backend.kernels.runtime import INTERPRET, check_device, dot_dtype, next_pow2, num_sms

_LOG2E = 1.4426950408889634
# Below this many positions per split, the extra reduce pass costs more than the parallelism
# gains on a GPU.
_MIN_SPLIT_LEN = 256
# tl.dot needs at least 16 rows; a GQA group is padded up to it.
_MIN_DOT = 16


@dataclass(frozen=True)
class DecodeLaunch:
    """Compile-time block size and launch shape of the split kernel for one head dim."""

    block_n: int
    num_warps: int
    num_stages: int


def decode_launch(head_dim: int) -> DecodeLaunch:
    """Block of positions per loop step: [block_n, head_dim] K and V tiles in registers."""
    if INTERPRET:
        # The interpreter pays per operation, not per element: fewer, larger steps.
        return DecodeLaunch(block_n=64, num_warps=1, num_stages=1)
    if head_dim <= 64:
        return DecodeLaunch(block_n=64, num_warps=4, num_stages=2)
    if head_dim <= 128:
        return DecodeLaunch(block_n=32, num_warps=4, num_stages=2)
    return DecodeLaunch(block_n=16, num_warps=4, num_stages=2)


@dataclass
class DecodePlan:
    """Split length and scratch buffers of one decode step, shared by all layers."""

    split_len: int
    num_splits: int
    mid_out: torch.Tensor  # fp32 [batch, q_heads, num_splits, head_dim]: normalised partial outputs
    mid_lse: torch.Tensor  # fp32 [batch, q_heads, num_splits]: their log2-sum-exp2 of scores


def plan_decode(batch: int, num_heads: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                device: torch.device, split_len: int | None = None) -> DecodePlan:
    """Choose how many positions each split program covers (unless `split_len` is given).

    Aim for about two programs per SM; never split below `_MIN_SPLIT_LEN` positions.
    """
    block_n = decode_launch(head_dim).block_n
    if split_len is None:
        wanted_splits = max(1, math.ceil(2 * num_sms(device) / max(1, batch * num_kv_heads)))
        split_len = max(_MIN_SPLIT_LEN, math.ceil(max_seq_len / wanted_splits))
    if split_len < 1:
        raise ValueError(f"split_len must be positive, got {split_len}")
    split_len = triton.cdiv(split_len, block_n) * block_n
    num_splits = triton.cdiv(max(1, max_seq_len), split_len)
    return DecodePlan(
        split_len=split_len,
        num_splits=num_splits,
        mid_out=torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=device),
        mid_lse=torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device),
    )


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, req_to_token_ptr, b_req_idx_ptr,
                         b_seq_len_ptr, mid_out_ptr, mid_lse_ptr,
                         stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_kst, stride_ksh, stride_vst, stride_vsh, stride_table,
                         stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                         qk_scale, group, head_dim, split_len,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, QUANTIZED: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(b_seq_len_ptr + batch)
    start = split * split_len
    # Splits past the end of this request's context have nothing to do (the batch's longest
    # context sets the grid); the reduce kernel never reads their slots.
    if start < seq_len:
        end = tl.minimum(start + split_len, seq_len)
        table_row = req_to_token_ptr + tl.load(b_req_idx_ptr + batch).to(tl.int64) * stride_table
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kv_head * group + g
        mask_g = g < group
        mask_d = d < head_dim
        q = tl.load(q_ptr + batch * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask_n = n < end
            slots = tl.load(table_row + n, mask=mask_n, other=0).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + slots[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0).to(DOT_DTYPE)
            # Scores in log2 units (qk_scale includes log2(e)) so the softmax can use exp2.
            if QUANTIZED:
                k_sc = tl.load(k_scale_ptr + slots * stride_kst + kv_head * stride_ksh, mask=mask_n, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * (k_sc * qk_scale)[None, :]
            else:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + slots[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                        mask=kv_mask, other=0.0).to(DOT_DTYPE)
            if QUANTIZED:
                # sum_n p[n] * (v_int[n] * v_scale[n]) = sum_n (p[n] * v_scale[n]) * v_int[n]; l_i
                # keeps the unscaled p.
                p = p * tl.load(v_scale_ptr + slots * stride_vst + kv_head * stride_vsh, mask=mask_n,
                                other=0.0)[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
            m_i = m_new

        out_mask = mask_g[:, None] & mask_d[None, :]
        tl.store(mid_out_ptr + batch * stride_mb + heads[:, None] * stride_mh + split * stride_ms + d[None, :],
                 acc / l_i[:, None], mask=out_mask)
        tl.store(mid_lse_ptr + batch * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=mask_g)


@triton.jit
def _decode_reduce_kernel(mid_out_ptr, mid_lse_ptr, b_seq_len_ptr, out_ptr,
                          stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ob, stride_oh,
                          head_dim, split_len, BLOCK_D: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < head_dim
    n_splits = tl.cdiv(tl.load(b_seq_len_ptr + batch), split_len)
    part_ptr = mid_out_ptr + batch * stride_mb + head * stride_mh + d
    lse_ptr = mid_lse_ptr + batch * stride_lb + head * stride_lh
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for split in range(0, n_splits):
        lse = tl.load(lse_ptr + split)
        part = tl.load(part_ptr + split * stride_ms, mask=mask_d, other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        weight = tl.exp2(lse - m_new)
        acc = acc * alpha + part * weight
        l_i = l_i * alpha + weight
        m_i = m_new
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=mask_d)


def token_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           req_to_token: torch.Tensor, b_req_idx: torch.Tensor, b_seq_len: torch.Tensor,
                           plan: DecodePlan, scale: float, out: torch.Tensor | None = None,
                           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, D] over each request's first b_seq_len[b] positions; returns [B, Hq, D].

    k_cache/v_cache [S, Hkv, D] are the pool; req_to_token [R, Lmax] (int32) maps a request's
    positions to slots; b_req_idx/b_seq_len (int32, [B]) pick the row and length per request;
    `plan` must come from `plan_decode` with this batch's size and longest length. An int8 pool
    passes its fp32 k_scale/v_scale [S, Hkv] (value = int8 * scale); q's dtype then sets the dot
    operands' dtype.
    """
    check_device(q.device)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads or k_cache.shape[2] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)} / "
                         f"v_cache {tuple(v_cache.shape)}")
    if plan.mid_out.shape[:2] != (batch, num_heads):
        raise ValueError("the decode plan was made for another batch shape")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("req_to_token", req_to_token)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    quantized = check_kv_scales(k_cache, v_cache, k_scale, v_scale)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    # A float pool: the kernel compiles without the scale loads; the cache stands in for them.
    k_scale, v_scale = (k_scale, v_scale) if quantized else (k_cache, v_cache)
    group = num_heads // num_kv_heads
    launch = decode_launch(head_dim)
    block_d = next_pow2(head_dim)
    mid_out, mid_lse = plan.mid_out, plan.mid_lse
    _decode_split_kernel[(batch, num_kv_heads, plan.num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, req_to_token, b_req_idx, b_seq_len, mid_out, mid_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1), req_to_token.stride(0),
        mid_out.stride(0), mid_out.stride(1), mid_out.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        scale * _LOG2E, group, head_dim, plan.split_len,
        BLOCK_G=max(_MIN_DOT, next_pow2(group)), BLOCK_N=launch.block_n, BLOCK_D=block_d,
        DOT_DTYPE=dot_dtype(q.dtype if quantized else k_cache.dtype), QUANTIZED=quantized,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    _decode_reduce_kernel[(batch, num_heads)](
        mid_out, mid_lse, b_seq_len, out,
        mid_out.stride(0), mid_out.stride(1), mid_out.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), head_dim, plan.split_len, BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2,
    )
    return out
