"""Attention in C: decode over the TokenAttention KV pool (`token_attention.c`) and bf16
prefill of new tokens (`context_attention.c`)."""

from __future__ import annotations

import torch

from lightserve.backend.cpu_kernels import build
from lightserve.backend.cpu_kernels.checks import check_rows

# Status codes returned by the C entry point (enum in token_attention.c).
_STATUS_MESSAGES = {
    1: "b_req_idx holds a row outside [0, req_to_token.shape[0])",
    2: "b_seq_len holds a length outside [1, req_to_token.shape[1]]",
    3: "req_to_token holds a slot outside [0, k_cache.shape[0]) for an attended position",
    4: "out of memory for the kernel's per-thread buffers",
}


def _check_index(name: str, t: torch.Tensor, shape: tuple[int, ...] | None) -> None:
    if t.device.type != "cpu" or t.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 CPU tensor, got {t.dtype} on {t.device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_int8_pool(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> None:
    """An int8 pool layer: int8 `k_cache`/`v_cache` [S, Hkv, D] and both scales, contiguous
    float32 CPU tensors [S, Hkv] (the kernels index them as such); ValueError otherwise."""
    if k_scale is None or v_scale is None:
        raise ValueError("an int8 pool needs both k_scale and v_scale")
    if k_cache.dtype != torch.int8 or v_cache.dtype != torch.int8:
        raise ValueError(f"k_cache and v_cache of an int8 pool must be int8, got {k_cache.dtype} and {v_cache.dtype}")
    rows = tuple(k_cache.shape[:2])
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.device.type != "cpu" or s.dtype != torch.float32 or tuple(s.shape) != rows or not s.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor of shape {rows}, "
                             f"got {s.dtype} {tuple(s.shape)} on {s.device}")


def token_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    b_req_idx: torch.Tensor,
    b_seq_len: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per request, reading K/V through the token table.

    Args:
        q: ``[B, Hq, D]`` fp32 or bf16 queries (inner dims contiguous; a row stride from a
            fused qkv projection is fine).
        k_cache, v_cache: ``[S, Hkv, D]`` one layer of the KV pool, same dtype as ``q``, or int8
            with ``k_scale``/``v_scale``. ``Hq`` must be a multiple of ``Hkv`` (GQA); query head h
            uses kv head ``h // (Hq // Hkv)``.
        req_to_token: int32 ``[R, Lmax]``; row r maps each position of request r to its slot.
        b_req_idx: int32 ``[B]``, the req_to_token row of each batch entry.
        b_seq_len: int32 ``[B]``, positions to attend per entry (including the new token),
            each in ``[1, Lmax]``.
        scale: softmax scale, usually ``D ** -0.5``.
        out: optional ``[B, Hq, D]`` output of q's dtype (may be ``q`` itself).
        k_scale, v_scale: for an int8 pool, float32 ``[S, Hkv]`` (contiguous): a slot's K/V
            values are its int8 row times its scale (`mem_manager.LayerKV`). With AVX512-VNNI
            and ``D`` a multiple of 64 the kernel quantizes q to 16 bits per head and each
            block's softmax weights to 15 bits (token_attention.c): outputs are within ~1e-4
            of the same attention in exact arithmetic for unit-scale inputs.

    Returns:
        ``out`` (or a new tensor) holding the attention output, ``[B, Hq, D]``.

    Raises:
        RuntimeError: the kernels are unavailable (see :func:`build.unavailable_reason`).
        ValueError: bad shapes, dtypes, devices or layouts, or an index out of range.
    """
    lib = build.require()
    check_rows("q", q, 3)
    check_rows("k_cache", k_cache, 3)
    check_rows("v_cache", v_cache, 3)
    if q.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"q must be float32 or bfloat16, got {q.dtype}")
    quantized = k_scale is not None or v_scale is not None
    if not quantized and (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    batch, n_q_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if quantized:
        check_int8_pool(k_cache, v_cache, k_scale, v_scale)
    n_slots, n_kv_heads, kv_dim = k_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and the cache ({kv_dim}) differ")
    if n_kv_heads == 0 or n_q_heads % n_kv_heads != 0:
        raise ValueError(f"q heads ({n_q_heads}) must be a multiple of kv heads ({n_kv_heads})")
    _check_index("req_to_token", req_to_token, None)
    if req_to_token.dim() != 2 or req_to_token.stride(1) != 1:
        raise ValueError(
            f"req_to_token must be 2-D with contiguous rows, got shape {tuple(req_to_token.shape)}"
        )
    _check_index("b_req_idx", b_req_idx, (batch,))
    _check_index("b_seq_len", b_seq_len, (batch,))
    b_req_idx = b_req_idx.contiguous()
    b_seq_len = b_seq_len.contiguous()
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        check_rows("out", out, 3)
        if out.shape != q.shape or out.dtype != q.dtype:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:  # no entries (or no heads): nothing to compute or validate
        return out

    status = lib.token_decode_attention(
        q.data_ptr(), q.stride(0),
        k_cache.data_ptr(), k_cache.stride(0),
        v_cache.data_ptr(), v_cache.stride(0),
        k_scale.data_ptr() if quantized else None, v_scale.data_ptr() if quantized else None,
        k_scale.stride(0) if quantized else 0,
        req_to_token.data_ptr(), req_to_token.stride(0), req_to_token.shape[0], req_to_token.shape[1],
        b_req_idx.data_ptr(), b_seq_len.data_ptr(), batch,
        n_slots, n_q_heads, n_kv_heads, head_dim,
        int(q.dtype == torch.bfloat16), float(scale),
        out.data_ptr(), out.stride(0),
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(_STATUS_MESSAGES.get(status, f"kernel failed with status {status}"))
    return out


# Shapes the prefill kernel takes (context_attention.c: MAX_D, MAX_GROUP).
CONTEXT_MAX_HEAD_DIM = 256
CONTEXT_MAX_GROUP = 16


def context_attention_supported() -> bool:
    """Whether this build has the bf16 prefill kernel (it needs AVX512-BF16)."""
    lib = build.load()
    return lib is not None and bool(lib.context_attention_supported())


def context_attention_fits(n_q_heads: int, n_kv_heads: int, head_dim: int) -> bool:
    """Whether the prefill kernel takes these heads: GQA groups of up to 16 query heads and a
    head_dim that is a multiple of 32 up to 256."""
    return (n_kv_heads > 0 and n_q_heads % n_kv_heads == 0 and n_q_heads // n_kv_heads <= CONTEXT_MAX_GROUP
            and head_dim % 32 == 0 and head_dim <= CONTEXT_MAX_HEAD_DIM)


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b_start: torch.Tensor, b_len: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal attention of each request's new tokens to themselves (no cached prefix), bf16.

    Args:
        q: ``[T, Hq, D]``, k/v: ``[T, Hkv, D]`` bf16 (inner dims contiguous, any row stride);
            heads and ``D`` as `context_attention_fits` allows.
        b_start, b_len: int64 ``[B]``: request b owns tokens ``[b_start[b], b_start[b] + b_len[b])``.
        scale: softmax scale.

    Returns:
        ``[T, Hq, D]`` bf16; rows of tokens no request owns are left uninitialised.

    Raises:
        RuntimeError: the kernel is unavailable or this build lacks AVX512-BF16.
        ValueError: bad shapes, dtypes or layouts, or a request outside ``[0, T)``.
    """
    lib = build.require()
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_rows(name, t, 3, torch.bfloat16)
    tokens, n_q_heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    n_kv_heads = k.shape[1]
    if not context_attention_fits(n_q_heads, n_kv_heads, head_dim):
        raise ValueError(f"unsupported heads/head_dim: {n_q_heads} q heads, {n_kv_heads} kv heads, head_dim {head_dim}")
    for name, t in (("b_start", b_start), ("b_len", b_len)):
        if t.device.type != "cpu" or t.dtype != torch.int64 or t.dim() != 1 or t.shape != b_start.shape:
            raise ValueError(f"{name} must be a 1-D int64 CPU tensor like b_start, got {t.dtype} {tuple(t.shape)}")
    b_start, b_len = b_start.contiguous(), b_len.contiguous()
    if len(b_len) and (int(b_len.min()) < 1 or int(b_start.min()) < 0 or int((b_start + b_len).max()) > tokens):
        raise ValueError(f"every request must own 1 or more tokens inside [0, {tokens})")
    out = torch.empty(q.shape, dtype=q.dtype)
    if len(b_len) == 0:
        return out
    status = lib.context_attention(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), out.data_ptr(), out.stride(0),
        b_start.data_ptr(), b_len.data_ptr(), len(b_len), n_q_heads, n_kv_heads, head_dim, float(scale),
        torch.get_num_threads(),
    )
    if status == 1:
        raise RuntimeError("context attention needs AVX512-BF16, which this CPU or build lacks")
    if status != 0:
        raise RuntimeError("out of memory for the context attention's packed K/V")
    return out
