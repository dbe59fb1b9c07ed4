"""The small layer ops in C (`layer_ops.c`), with the semantics of `TorchOps`.

`CpuOps` is what the `cpu_native` attention back end hands the layer template: one C call per
op instead of 3-12 torch ops (see layer_ops.c for why that matters on a CPU).

Inputs are fp32 or bf16 CPU tensors whose rows may be strided (views into the fused qkv or
gate_up output) but whose elements within a row are contiguous; anything else raises
ValueError.
"""

from __future__ import annotations

import torch

from lightserve.backend.cpu_kernels import build
from lightserve.backend.cpu_kernels.attention import check_int8_pool
from lightserve.backend.cpu_kernels.checks import check_rows
from lightserve.backend.mem_manager import LayerKV
from lightserve.backend.models.torch_ops import adjacent_heads

_DTYPES = (torch.float32, torch.bfloat16)


def _dtype_of(x: torch.Tensor) -> torch.dtype:
    if x.dtype not in _DTYPES:
        raise ValueError(f"the CPU kernels take float32 or bfloat16, got {x.dtype}")
    return x.dtype


def _norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = _dtype_of(x)
    check_rows("x", x, dtype=dtype)
    check_rows("weight", weight, dtype=dtype)
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x must be [rows, dim] and weight [dim], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if delta is not None:
        check_rows("delta", delta, dtype=dtype)
        if delta.shape != x.shape:
            raise ValueError(f"delta {tuple(delta.shape)} and x {tuple(x.shape)} differ")
    out = torch.empty(x.shape, dtype=dtype)
    if x.numel():
        build.require().rms_norm(
            x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
            0 if delta is None else delta.stride(0), out.data_ptr(), out.stride(0), weight.data_ptr(),
            x.shape[0], x.shape[1], float(eps), int(dtype == torch.bfloat16), torch.get_num_threads(),
        )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [rows, dim] (a new tensor)."""
    return _norm(x, None, weight, eps)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden += delta (in place), then RMSNorm of the sum: returns (hidden, normed)."""
    return hidden, _norm(hidden, delta, weight, eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    dtype = _dtype_of(x)
    check_rows("x", x, dtype=dtype)
    rows, heads, head_dim = x.shape
    if head_dim % 2 or cos.shape != (rows, head_dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{rows}, {head_dim // 2}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    check_rows("cos", cos, dtype=torch.float32)
    check_rows("sin", sin, dtype=torch.float32)
    if x.numel():
        build.require().rotary(x.data_ptr(), x.stride(0), rows, heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                               int(dtype == torch.bfloat16), torch.get_num_threads())


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by per-token cos/sin [T, D/2] (fp32)."""
    qk = adjacent_heads(q, k)
    for x in (q, k) if qk is None else (qk,):
        _rotate(x, cos, sin)
    return q, k


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of gate_up [T, 2I] (gate first), as a new [T, I] tensor."""
    dtype = _dtype_of(gate_up)
    check_rows("gate_up", gate_up, dtype=dtype)
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [rows, 2 * intermediate], got {tuple(gate_up.shape)}")
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((rows, inter), dtype=dtype)
    if out.numel():
        build.require().silu_and_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), rows,
                                     inter, int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """k_cache[slots] = k and v_cache[slots] = v, rows [T, Hkv, D]; ValueError (nothing written)
    if a slot is outside the pool. An int8 pool (with k_scale/v_scale [S, Hkv] fp32) gets fp32 or
    bf16 rows quantized as `mem_manager.quantize_kv` does, bit for bit."""
    quantized = k_scale is not None or v_scale is not None
    dtype = _dtype_of(k) if quantized else k_cache.dtype
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_rows(name, t, dtype=torch.int8 if quantized else dtype)
    for name, t in (("k", k), ("v", v)):
        check_rows(name, t, dtype=dtype)
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if k.shape[1:] != k_cache.shape[1:] or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the cache rows {tuple(k_cache.shape[1:])}")
    if slots.device.type != "cpu" or slots.dtype != torch.int64 or slots.shape != (k.shape[0],):
        raise ValueError(f"slots must be an int64 CPU tensor of shape [{k.shape[0]}], got {slots.dtype} {tuple(slots.shape)}")
    slots = slots.contiguous()
    if quantized:
        check_int8_pool(k_cache, v_cache, k_scale, v_scale)
        status = build.require().write_kv_int8(
            k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.stride(0), k_scale.data_ptr(), v_scale.data_ptr(), k_scale.stride(0), slots.data_ptr(),
            k.shape[0], k_cache.shape[0], k.shape[1], k.shape[2], int(dtype == torch.bfloat16),
        )
    else:
        status = build.require().write_kv(
        k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.stride(0), slots.data_ptr(), k.shape[0], k_cache.shape[0],
            k.shape[1] * k.shape[2] * k.element_size(), k.element_size(),
        )
    if status != 0:
        raise ValueError(f"slots hold an index outside [0, {k_cache.shape[0]})")


class CpuOps:
    """Namespace of the layer ops in C (static methods, no state)."""

    rms_norm = staticmethod(rms_norm)
    add_rms_norm = staticmethod(add_rms_norm)
    rotary = staticmethod(rotary)
    silu_and_mul = staticmethod(silu_and_mul)

    @staticmethod
    def write_kv(kv: LayerKV, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(kv.k, kv.v, slots, k, v, kv.k_scale, kv.v_scale)
