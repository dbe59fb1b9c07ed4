"""The C layer ops (`CpuOps`) against the torch reference (`TorchOps`) they replace.

bf16 results must be bit-identical except RMSNorm, whose sum of squares adds in another order
(a few elements in ten thousand may differ, by one or two bf16 units: the normalised value is
rounded to bf16 before the weight multiply and again after); fp32 results agree to rounding. Inputs are strided views of fused projections, as the layer template passes them.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightserve.backend import cpu_kernels
from lightserve.backend.cpu_kernels import layer_ops
from lightserve.backend.cpu_kernels.layer_ops import CpuOps
from lightserve.backend.mem_manager import LayerKV
from lightserve.backend.models.torch_ops import TorchOps

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}"
)

DTYPES = [torch.bfloat16, torch.float32]
FP32 = dict(atol=1e-5, rtol=1e-5)


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, near_ulps: int = 0) -> None:
    """bf16: bit-identical, or at most `near_ulps` elements at most two bf16 units apart; fp32: rounding."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, **FP32)
        return
    differ = actual.view(torch.int16) != expected.view(torch.int16)
    assert int(differ.sum()) <= near_ulps, f"{int(differ.sum())} elements differ"
    if differ.any():
        ulp = (actual.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
        assert int(ulp.max()) <= 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_and_residual_add(dtype, rows):
    # A strided input (a slice of a wider buffer) and a width that is not a multiple of 16.
    hidden = randn(rows, 600, dtype=dtype, scale=3.0)[:, :580]
    delta = randn(rows, 580, dtype=dtype, seed=1)
    weight = randn(580, dtype=dtype, seed=2)
    allowed = max(1, rows * 580 // 2000)  # summation order: ~1 element in 10^4 may round apart
    assert_close(layer_ops.rms_norm(hidden, weight, 1e-5), TorchOps.rms_norm(hidden, weight, 1e-5), allowed)

    expected_hidden, expected = TorchOps.add_rms_norm(hidden.clone(), delta, weight, 1e-6)
    ours = hidden.clone()
    returned, normed = layer_ops.add_rms_norm(ours, delta, weight, 1e-6)
    assert returned is ours  # the residual stream is updated in place
    assert torch.equal(ours, expected_hidden)  # the add itself rounds exactly like torch
    assert_close(normed, expected, allowed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adjacent", [True, False])
def test_rotary_in_place_matches_torch(dtype, adjacent):
    rows, hq, hk, d = 37, 9, 3, 64
    qkv = randn(rows, (hq + 2 * hk) * d, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    angles = torch.randint(0, 4000, (rows, 1), generator=gen).float() * (1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos, sin = angles.cos(), angles.sin()

    def views(buf: torch.Tensor):
        q = buf[:, : hq * d].view(rows, hq, d)
        k = buf[:, hq * d: (hq + hk) * d].view(rows, hk, d)
        # Not adjacent: k taken from the v range, so q and k cannot be rotated in one pass.
        return (q, k) if adjacent else (q, buf[:, (hq + hk) * d:].view(rows, hk, d))

    expected_q, expected_k = TorchOps.rotary(*views(qkv), cos, sin)
    ours = qkv.clone()
    q, k = layer_ops.rotary(*views(ours), cos, sin)
    assert q.data_ptr() == ours.data_ptr()  # rotated in place
    assert_close(q, expected_q)
    assert_close(k, expected_k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_torch_over_a_wide_range(dtype):
    # gate values from -120 to 120 reach exp's clamps on both sides.
    gate_up = randn(64, 2 * 1000, dtype=dtype, scale=40.0)[:, :2 * 999]
    gate_up[0, :999] = torch.linspace(-120, 120, 999).to(dtype)
    assert_close(layer_ops.silu_and_mul(gate_up), TorchOps.silu_and_mul(gate_up))


def test_silu_of_nan_and_infinities_is_torch_s():
    # silu(-inf) = -inf / (1 + inf) is NaN in torch too; what matters is that nothing differs.
    gate = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30])
    gate_up = torch.cat([gate, torch.ones(7)]).view(1, 14)
    torch.testing.assert_close(layer_ops.silu_and_mul(gate_up), TorchOps.silu_and_mul(gate_up), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_fills_exactly_the_given_slots(dtype):
    slots_total, hk, d, rows = 50, 3, 64, 9
    qkv = randn(rows, 5 * hk * d, dtype=dtype)
    k = qkv[:, hk * d: 2 * hk * d].view(rows, hk, d)
    v = qkv[:, 3 * hk * d: 4 * hk * d].view(rows, hk, d)
    slots = torch.randperm(slots_total, generator=torch.Generator().manual_seed(4))[:rows]
    expected_k, expected_v = torch.zeros(slots_total, hk, d, dtype=dtype), torch.zeros(slots_total, hk, d, dtype=dtype)
    TorchOps.write_kv(LayerKV(expected_k, expected_v), slots, k, v)
    k_cache, v_cache = torch.zeros_like(expected_k), torch.zeros_like(expected_v)
    layer_ops.write_kv(k_cache, v_cache, slots, k, v)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_write_kv_with_a_bad_slot_writes_nothing():
    k_cache, v_cache = torch.zeros(8, 1, 16), torch.zeros(8, 1, 16)
    k = v = torch.ones(3, 1, 16)
    for bad in (8, -1):
        with pytest.raises(ValueError, match="outside"):
            layer_ops.write_kv(k_cache, v_cache, torch.tensor([0, bad, 2]), k, v)
    assert not k_cache.any() and not v_cache.any()


def int8_pool(slots_total: int, heads: int, dim: int) -> LayerKV:
    """An empty int8 pool layer, as MemoryManager(..., kv_dtype=torch.int8) holds it."""
    zeros = torch.zeros(slots_total, heads, dim, dtype=torch.int8)
    return LayerKV(zeros, zeros.clone(), torch.zeros(slots_total, heads), torch.zeros(slots_total, heads))


def assert_pools_equal(got: LayerKV, want: LayerKV) -> None:
    for name in ("k", "v", "k_scale", "v_scale"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 40])  # 40: a scalar tail after the 16-wide steps
def test_write_kv_int8_equals_torch_bit_for_bit(dtype, dim):
    # Rows strided in a fused qkv output, magnitudes from 1e-30 to 1e30, an all-zero token and an
    # all-zero head. bf16 inputs land on x * 127 / absmax = n + 0.5 often, so the rounding of
    # ties and of 127 / absmax itself is exercised.
    slots_total, heads, rows = 300, 3, 200
    gen = torch.Generator().manual_seed(dim)
    magnitude = 10.0 ** torch.randint(-30, 31, (rows, 1), generator=gen).float()
    qkv = (torch.randn(rows, 5 * heads * dim, generator=gen) * magnitude).to(dtype)
    k = qkv[:, heads * dim: 2 * heads * dim].view(rows, heads, dim)
    v = qkv[:, 3 * heads * dim: 4 * heads * dim].view(rows, heads, dim)
    k[3] = 0
    v[5, 1] = 0
    slots = torch.randperm(slots_total, generator=gen)[:rows]
    expected, ours = int8_pool(slots_total, heads, dim), int8_pool(slots_total, heads, dim)
    TorchOps.write_kv(expected, slots, k, v)
    CpuOps.write_kv(ours, slots, k, v)
    assert_pools_equal(ours, expected)
    assert not expected.k_scale[slots[3]].any() and not expected.v_scale[slots[5], 1]


def test_write_kv_int8_with_a_bad_slot_writes_nothing():
    pool = int8_pool(8, 2, 16)
    k = v = torch.ones(3, 2, 16, dtype=torch.bfloat16)
    for bad in (8, -1):
        with pytest.raises(ValueError, match="outside"):
            CpuOps.write_kv(pool, torch.tensor([0, bad, 2]), k, v)
    assert_pools_equal(pool, int8_pool(8, 2, 16))


def _int8_write_args(**change: torch.Tensor | None) -> list:
    """write_kv's arguments for one fp32 row into a 4-slot int8 pool, with `change` applied."""
    args = dict(k_cache=torch.zeros(4, 1, 8, dtype=torch.int8), v_cache=torch.zeros(4, 1, 8, dtype=torch.int8),
                slots=torch.tensor([1]), k=torch.ones(1, 1, 8), v=torch.ones(1, 1, 8), k_scale=torch.zeros(4, 1),
                v_scale=torch.zeros(4, 1))
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize("call, message", [
    (lambda: layer_ops.rms_norm(torch.ones(2, 8, dtype=torch.float16), torch.ones(8, dtype=torch.float16), 1e-5),
     "float32 or bfloat16"),
    (lambda: layer_ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5), r"weight \[dim\]"),
    (lambda: layer_ops.rms_norm(torch.ones(8, 2).t(), torch.ones(8), 1e-5), "contiguous inner dims"),
    (lambda: layer_ops.add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), torch.ones(8), 1e-5), "differ"),
    (lambda: layer_ops.silu_and_mul(torch.ones(2, 7)), "2 \\* intermediate"),
    (lambda: layer_ops.rotary(torch.ones(2, 1, 8), torch.ones(2, 1, 8), torch.ones(2, 3), torch.ones(2, 3)),
     "cos/sin"),
    (lambda: layer_ops.write_kv(torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), torch.tensor([0], dtype=torch.int32),
                                torch.ones(1, 1, 8), torch.ones(1, 1, 8)), "int64"),
    (lambda: layer_ops.write_kv(*_int8_write_args(v_scale=None)), "needs both k_scale and v_scale"),
    (lambda: layer_ops.write_kv(*_int8_write_args(k_scale=torch.zeros(4, 1, dtype=torch.float64))),
     "k_scale must be a contiguous float32"),
    (lambda: layer_ops.write_kv(*_int8_write_args(v_scale=torch.zeros(3, 1))), r"v_scale must .* shape \(4, 1\)"),
    (lambda: layer_ops.write_kv(*_int8_write_args(k=torch.ones(1, 1, 8, dtype=torch.float16))), "float32 or bfloat16"),
    (lambda: layer_ops.write_kv(*_int8_write_args(k_cache=torch.zeros(4, 1, 8))), "k_cache must be torch.int8"),
])
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_empty_inputs():
    assert layer_ops.rms_norm(torch.ones(0, 8), torch.ones(8), 1e-5).shape == (0, 8)
    assert layer_ops.silu_and_mul(torch.ones(0, 8)).shape == (0, 4)
    layer_ops.write_kv(torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), torch.zeros(0, dtype=torch.int64),
                       torch.ones(0, 1, 8), torch.ones(0, 1, 8))
