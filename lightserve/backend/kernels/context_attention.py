"""Prefill ("context") attention over packed new tokens, reading K/V through a token table.

The new tokens of all requests are packed back to back without padding: request i owns query
rows [b_q_start[i], b_q_start[i] + b_new_len[i]) and those tokens sit at positions
[b_seq_len[i] - b_new_len[i], b_seq_len[i]) of the request. Keys and values of every position
< b_seq_len[i] are read through ``table[rows[i], position]`` from the K/V source, so a prefix that
is already in the pool (cached or computed earlier) is attended like the new tokens. A query
at position p sees positions <= p.

K/V come from the TokenAttention pool through ``req_to_token``, written before the call.

Grid (requests, q_heads, query blocks): each program holds a [BLOCK_M, D] block of queries of
one head and streams [BLOCK_N, D] K/V tiles with an online softmax, stopping at the block's
last causal position. GQA reads the KV head of the query head (K/V are never repeated).

An int8 pool (value = int8 * scale, one fp32 scale per slot and KV head) runs the same algorithm:
the int8 K/V tiles are converted to the query's dot dtype (exact: |int8| <= 127), each position's
K scale multiplies its column of scores and its V scale its column of probabilities before P @ V,
so no tile is dequantized element by element. The chunk's own tokens are read back quantized
from the pool like the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lightserve.backend.kernels.kv_copy import check_kv_scales
from lightserve.backend.kernels.runtime import INTERPRET, check_device, dot_dtype, next_pow2

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ContextLaunch:
    """Compile-time tile sizes of the prefill kernel for one head dim."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def context_launch(head_dim: int) -> ContextLaunch:
    if INTERPRET:
        # The interpreter pays per operation, not per element; 32 still exercises several
        # query and key blocks on small test prompts.
        return ContextLaunch(block_m=32, block_n=32, num_warps=1, num_stages=1)
    if head_dim <= 64:
        return ContextLaunch(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        return ContextLaunch(block_m=64, block_n=64, num_warps=4, num_stages=2)
    return ContextLaunch(block_m=32, block_n=32, num_warps=4, num_stages=2)


@triton.jit
def _context_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, out_ptr, table_ptr, rows_ptr, b_seq_len_ptr,
                    b_new_len_ptr, b_q_start_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kst, stride_ksh, stride_vst, stride_vsh, stride_ot, stride_oh,
                    stride_table, qk_scale, group, head_dim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    QUANTIZED: tl.constexpr):
    req = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    m0 = tl.program_id(2) * BLOCK_M
    new_len = tl.load(b_new_len_ptr + req)
    # The grid covers the longest request; shorter ones have fewer query blocks.
    if m0 < new_len:
        seq_len = tl.load(b_seq_len_ptr + req)
        prefix = seq_len - new_len
        q_start = tl.load(b_q_start_ptr + req).to(tl.int64)
        table_row = table_ptr + tl.load(rows_ptr + req).to(tl.int64) * stride_table
        kv_head = head // group

        m = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        mask_m = m < new_len
        mask_d = d < head_dim
        q_rows = q_start + m
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
        pos_m = prefix + m  # query positions; rows past new_len see everything and are not stored

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.minimum(seq_len, prefix + m0 + BLOCK_M)  # one past the block's last causal position
        for n0 in range(0, kv_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask_n = n < kv_end
            slots = tl.load(table_row + n, mask=mask_n, other=0).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + slots[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0).to(DOT_DTYPE)
            if QUANTIZED:
                k_sc = tl.load(k_scale_ptr + slots * stride_kst + kv_head * stride_ksh, mask=mask_n, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * (k_sc * qk_scale)[None, :]
            else:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
            visible = mask_n[None, :] & (n[None, :] <= pos_m[:, None])
            s = tl.where(visible, s, float("-inf"))
            # Position 0 is visible to every row, so m_new is finite from the first tile on.
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

        o = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def context_attention(q: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor, table: torch.Tensor,
                      rows: torch.Tensor, b_seq_len: torch.Tensor, b_new_len: torch.Tensor,
                      b_q_start: torch.Tensor, max_new_len: int, scale: float,
                      out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the packed queries q [T, Hq, D]; returns [T, Hq, D].

    k_src/v_src [S, Hkv, D]: where K/V live (the pool, or the packed new k/v); table [R, L]
    int32 with rows [B] int32 selecting each request's row; b_seq_len, b_new_len, b_q_start
    int32 [B] as in the module docstring; max_new_len = max(b_new_len) (sets the grid). An int8
    pool passes its fp32 k_scale/v_scale [S, Hkv] (value = int8 * scale); q's dtype then sets the
    dot operands' dtype.
    """
    check_device(q.device)
    n_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_src.shape[1]
    if num_heads % num_kv_heads or k_src.shape[2] != head_dim or v_src.shape[1:] != k_src.shape[1:]:
        raise ValueError(f"q {tuple(q.shape)} does not fit k {tuple(k_src.shape)} / v {tuple(v_src.shape)}")
    for name, t in (("q", q), ("k", k_src), ("v", v_src), ("table", table)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim")
    quantized = check_kv_scales(k_src, v_src, k_scale, v_scale)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch = b_new_len.shape[0]
    if n_tokens == 0 or batch == 0 or max_new_len == 0:
        return out
    # A float pool: the kernel compiles without the scale loads; the K/V source stands in for them.
    k_scale, v_scale = (k_scale, v_scale) if quantized else (k_src, v_src)
    launch = context_launch(head_dim)
    grid = (batch, num_heads, triton.cdiv(max_new_len, launch.block_m))
    _context_kernel[grid](
        q, k_src, v_src, k_scale, v_scale, out, table, rows, b_seq_len, b_new_len, b_q_start,
        q.stride(0), q.stride(1), k_src.stride(0), k_src.stride(1), v_src.stride(0), v_src.stride(1),
        k_scale.stride(0), k_scale.stride(1), v_scale.stride(0), v_scale.stride(1),
        out.stride(0), out.stride(1), table.stride(0), scale * _LOG2E, num_heads // num_kv_heads, head_dim,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_D=next_pow2(head_dim),
        DOT_DTYPE=dot_dtype(q.dtype if quantized else k_src.dtype), QUANTIZED=quantized,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
