"""Triton kernel tests, run in the Triton interpreter by `test_triton_kernels.py` in a subprocess.

Not collected by the main pytest run (no ``test_`` prefix): the interpreter is picked when the
kernel modules are imported, so these tests need TRITON_INTERPRET=1 in a fresh process. The
subprocess gets it in its environment; setting it here as well keeps a direct run
(``python -m pytest tests/triton_cases.py``) correct.

References are plain torch in fp32 on the same (possibly half-precision) inputs. KV slots are a
random permutation of the pool, and every table entry past a request's length points at a pool
row full of NaN, so a kernel that reads beyond a request's context fails loudly (in an int8 pool
that row's scales are NaN). Int8 pools are checked against float64 attention over their
dequantized values.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

from dataclasses import dataclass  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightserve.backend.attention import TorchAttention  # noqa: E402
from lightserve.backend.engine import ModelEngine  # noqa: E402
from lightserve.backend.forward_state import ForwardState  # noqa: E402
from lightserve.backend.kernels import runtime  # noqa: E402
from lightserve.backend.kernels.context_attention import context_attention  # noqa: E402
from lightserve.backend.kernels.kv_copy import write_kv  # noqa: E402
from lightserve.backend.kernels.ops import TritonOps  # noqa: E402
from lightserve.backend.kernels.token_attention_decode import plan_decode, token_attention_decode  # noqa: E402
from lightserve.backend.kernels.triton_attention import TritonAttention  # noqa: E402
from lightserve.backend.mem_manager import LayerKV, quantize_kv  # noqa: E402
from lightserve.backend.models.rotary import apply_rotary  # noqa: E402
from lightserve.backend.models.torch_ops import TorchOps  # noqa: E402
from lightserve.server_args import ServerArgs  # noqa: E402
from tests.engine_steps import assert_kv_whole, greedy_with_late_joiners  # noqa: E402

assert runtime.INTERPRET, "TRITON_INTERPRET=1 must be set before the kernel modules are imported"

# fp32: summation order only. fp16: output rounding (2^-11) and P rounded to fp16 before P@V.
# bf16 (operands upcast in the interpreter): output rounding, and the interpreter truncates
# fp32 -> bf16 instead of rounding to nearest, so up to one bf16 ulp (2^-7 relative).
ATTN_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
            torch.bfloat16: dict(atol=3e-2, rtol=2**-7)}
LENS = [1, 2, 17, 130]


@dataclass
class Pool:
    """A KV pool with requests scattered over it and the token table that finds them."""

    k_cache: torch.Tensor  # [S, Hkv, D]
    v_cache: torch.Tensor
    req_to_token: torch.Tensor  # int32 [R, Lmax]
    b_req_idx: torch.Tensor  # int32 [B]
    b_seq_len: torch.Tensor  # int32 [B]
    k_scale: Optional[torch.Tensor] = None  # fp32 [S, Hkv] of an int8 pool
    v_scale: Optional[torch.Tensor] = None

    def slots(self, i: int) -> torch.Tensor:
        return self.req_to_token[int(self.b_req_idx[i]), : int(self.b_seq_len[i])].long()

    def layer(self) -> LayerKV:
        return LayerKV(self.k_cache, self.v_cache, self.k_scale, self.v_scale)

    def values(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [S, Hkv, D] as `dtype` (an int8 pool's products int8 * scale formed in `dtype`)."""
        if self.k_scale is None:
            return self.k_cache.to(dtype), self.v_cache.to(dtype)
        return tuple(c.to(dtype) * sc.to(dtype)[..., None] for c, sc in ((self.k_cache, self.k_scale),
                                                                         (self.v_cache, self.v_scale)))


def make_pool(lens: list[int], n_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> Pool:
    gen = torch.Generator().manual_seed(seed)
    n_used = sum(lens)
    spare = 5
    n_slots = n_used + spare + 1  # the last slot is the NaN poison row
    poison = n_slots - 1
    perm = torch.randperm(n_slots - 1, generator=gen).to(torch.int32)
    rows = len(lens) + 3
    req_to_token = torch.full((rows, max(lens) + 7), poison, dtype=torch.int32)
    b_req_idx = torch.randperm(rows, generator=gen)[: len(lens)].to(torch.int32)
    start = 0
    for row, n in zip(b_req_idx.tolist(), lens):
        req_to_token[row, :n] = perm[start : start + n]
        start += n
    k = torch.randn(n_slots, n_kv_heads, head_dim, generator=gen)
    v = torch.randn(n_slots, n_kv_heads, head_dim, generator=gen)
    k[poison] = float("nan")
    v[poison] = float("nan")
    return Pool(k.to(dtype), v.to(dtype), req_to_token, b_req_idx, torch.tensor(lens, dtype=torch.int32))


def make_int8_pool(lens: list[int], n_kv_heads: int, head_dim: int, seed: int = 0) -> Pool:
    """`make_pool`'s requests in an int8 pool, quantized by the reference; the poison row's
    scales are NaN."""
    pool = make_pool(lens, n_kv_heads, head_dim, torch.float32, seed)
    (k, k_scale), (v, v_scale) = quantize_kv(pool.k_cache.nan_to_num()), quantize_kv(pool.v_cache.nan_to_num())
    k_scale[-1] = v_scale[-1] = float("nan")
    return Pool(k, v, pool.req_to_token, pool.b_req_idx, pool.b_seq_len, k_scale, v_scale)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [n, Hq, D] at positions first_pos.. over k/v [L, Hkv, D]; causal; [n, Hq, D] computed in `dtype`."""
    n, length = q.shape[0], k.shape[0]
    visible = torch.arange(length)[None, :] <= (first_pos + torch.arange(n))[:, None]
    o = F.scaled_dot_product_attention(q.to(dtype).transpose(0, 1), k.to(dtype).transpose(0, 1),
                                       v.to(dtype).transpose(0, 1), attn_mask=visible, scale=q.shape[-1] ** -0.5,
                                       enable_gqa=True)
    return o.transpose(0, 1)


# ---- decode ---------------------------------------------------------------------------------

# A pairwise covering set, as for context attention below: every pair of factor values appears.
@pytest.mark.parametrize("group, head_dim, dtype", [
    (1, 64, torch.float32), (1, 128, torch.float16), (3, 64, torch.float16),
    (3, 128, torch.float32), (4, 64, torch.float16), (4, 128, torch.float32),
])
def test_decode_matches_reference(group: int, head_dim: int, dtype: torch.dtype):
    n_kv = 2
    pool = make_pool(LENS, n_kv, head_dim, dtype, seed=group * head_dim)
    q = torch.randn(len(LENS), n_kv * group, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = torch.stack([reference_attention(q[i : i + 1], pool.k_cache[pool.slots(i)], pool.v_cache[pool.slots(i)],
                                                LENS[i] - 1)[0] for i in range(len(LENS))])
    # None: the automatic plan (one split here); 64: several splits merged by the reduce kernel.
    for split_len in (None, 64):
        plan = plan_decode(len(LENS), q.shape[1], n_kv, head_dim, max(LENS), q.device, split_len)
        out = token_attention_decode(q, pool.k_cache, pool.v_cache, pool.req_to_token, pool.b_req_idx,
                                     pool.b_seq_len, plan, head_dim**-0.5)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, **ATTN_TOL[dtype], msg=f"split_len={split_len}")


def test_decode_bf16_and_strided_query():
    """bf16 K/V (upcast after load) and q a strided view into a fused qkv buffer."""
    n_kv, group, head_dim = 2, 3, 64
    pool = make_pool(LENS, n_kv, head_dim, torch.bfloat16, seed=5)
    qkv = torch.randn(len(LENS), (n_kv * group + 2 * n_kv) * head_dim, generator=torch.Generator().manual_seed(2))
    q = qkv.to(torch.bfloat16)[:, : n_kv * group * head_dim].view(len(LENS), n_kv * group, head_dim)
    assert not q.is_contiguous()
    plan = plan_decode(len(LENS), n_kv * group, n_kv, head_dim, max(LENS), q.device, 32)
    out = token_attention_decode(q, pool.k_cache, pool.v_cache, pool.req_to_token, pool.b_req_idx, pool.b_seq_len,
                                 plan, head_dim**-0.5)
    expected = torch.stack([reference_attention(q[i : i + 1], pool.k_cache[pool.slots(i)], pool.v_cache[pool.slots(i)],
                                                LENS[i] - 1)[0] for i in range(len(LENS))])
    torch.testing.assert_close(out.float(), expected, **ATTN_TOL[torch.bfloat16])


# The kernels compute int8 * scale products in fp32 (folded into the scores and into P), so
# against float64 an fp32 query sees only fp32 rounding, well inside ATTN_TOL (and 1e-3). An fp16
# query keeps fp16 dot operands: P * v_scale is rounded to fp16 before P @ V, and so is the
# output (2^-11 relative each), hence the fp16 tolerance.
@pytest.mark.parametrize("dtype, split_len", [(torch.float32, 64), (torch.float16, None)])
def test_decode_int8_pool_matches_float64_reference(dtype: torch.dtype, split_len: int | None):
    n_kv, group, head_dim = 2, 3, 64
    pool = make_int8_pool(LENS, n_kv, head_dim, seed=12)
    q = torch.randn(len(LENS), n_kv * group, head_dim, generator=torch.Generator().manual_seed(13)).to(dtype)
    plan = plan_decode(len(LENS), q.shape[1], n_kv, head_dim, max(LENS), q.device, split_len)
    out = token_attention_decode(q, pool.k_cache, pool.v_cache, pool.req_to_token, pool.b_req_idx, pool.b_seq_len,
                                 plan, head_dim**-0.5, k_scale=pool.k_scale, v_scale=pool.v_scale)
    assert out.dtype == dtype
    k, v = pool.values(torch.float64)
    expected = torch.stack([reference_attention(q[i : i + 1], k[pool.slots(i)], v[pool.slots(i)], LENS[i] - 1,
                                                torch.float64)[0] for i in range(len(LENS))])
    torch.testing.assert_close(out.double(), expected, **ATTN_TOL[dtype])


def test_plan_splits_only_on_long_contexts_or_small_batches():
    cpu = torch.device("cpu")
    assert plan_decode(64, 8, 2, 64, 4096, cpu).num_splits == 1
    plan = plan_decode(1, 8, 2, 64, 100, cpu, split_len=30)
    assert plan.split_len == 64 and plan.num_splits == 2  # rounded up to whole blocks
    assert plan.mid_out.shape == (1, 8, 2, 64) and plan.mid_lse.shape == (1, 8, 2)


# ---- prefill --------------------------------------------------------------------------------

def _prefill_case(new_lens: list[int], prefix_lens: list[int], n_kv: int, group: int, head_dim: int,
                  dtype: torch.dtype, seed: int):
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    pool = make_pool(seq_lens, n_kv, head_dim, dtype, seed=seed)
    q = torch.randn(sum(new_lens), n_kv * group, head_dim, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    starts = [sum(new_lens[:i]) for i in range(len(new_lens))]
    return pool, q, starts, seq_lens


# Every pair of values of any two of the four factors appears (a pairwise covering set: 6 cases
# instead of all 24; the interpreter runs each in about 0.4 s).
@pytest.mark.parametrize("with_prefix, group, head_dim, dtype", [
    (False, 1, 64, torch.float32), (True, 1, 128, torch.float16),
    (True, 3, 64, torch.float16), (False, 3, 128, torch.float32),
    (False, 4, 64, torch.float16), (True, 4, 128, torch.float32),
])
def test_context_attention_matches_reference(with_prefix: bool, group: int, head_dim: int, dtype: torch.dtype):
    new_lens = [1, 2, 17, 70]
    prefix_lens = [3, 0, 40, 60] if with_prefix else [0, 0, 0, 0]
    pool, q, starts, seq_lens = _prefill_case(new_lens, prefix_lens, 2, group, head_dim, dtype, seed=group + head_dim)
    i32 = dict(dtype=torch.int32)
    out = context_attention(q, pool.k_cache, pool.v_cache, pool.req_to_token, pool.b_req_idx, pool.b_seq_len,
                            torch.tensor(new_lens, **i32), torch.tensor(starts, **i32), max(new_lens), head_dim**-0.5)
    assert out.dtype == dtype
    for i, (start, n) in enumerate(zip(starts, new_lens)):
        expected = reference_attention(q[start : start + n], pool.k_cache[pool.slots(i)], pool.v_cache[pool.slots(i)],
                                       prefix_lens[i])
        torch.testing.assert_close(out[start : start + n].float(), expected, **ATTN_TOL[dtype], msg=f"request {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # tolerances: as for int8 decode
def test_context_attention_int8_pool_matches_float64_reference(dtype: torch.dtype):
    new_lens, prefix_lens = [1, 17, 40], [3, 0, 30]
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    n_kv, group, head_dim = 2, 3, 64
    pool = make_int8_pool(seq_lens, n_kv, head_dim, seed=14)
    q = torch.randn(sum(new_lens), n_kv * group, head_dim, generator=torch.Generator().manual_seed(15)).to(dtype)
    starts = [sum(new_lens[:i]) for i in range(len(new_lens))]
    i32 = dict(dtype=torch.int32)
    out = context_attention(q, pool.k_cache, pool.v_cache, pool.req_to_token, pool.b_req_idx, pool.b_seq_len,
                            torch.tensor(new_lens, **i32), torch.tensor(starts, **i32), max(new_lens), head_dim**-0.5,
                            k_scale=pool.k_scale, v_scale=pool.v_scale)
    assert out.dtype == dtype
    k, v = pool.values(torch.float64)
    for i, (start, n) in enumerate(zip(starts, new_lens)):
        expected = reference_attention(q[start : start + n], k[pool.slots(i)], v[pool.slots(i)], prefix_lens[i],
                                       torch.float64)
        torch.testing.assert_close(out[start : start + n].double(), expected, **ATTN_TOL[dtype], msg=f"request {i}")


# ---- the back end against TorchAttention ----------------------------------------------------

def _state(pool: Pool, num_decode: int, new_lens: list[int]) -> ForwardState:
    """A mixed step over the pool's requests: the first `num_decode` decode one token, the others
    compute their last `new_lens[j]` positions (a prefix when that is less than their length)."""
    seq = pool.b_seq_len.tolist()
    all_new = [1] * num_decode + new_lens
    positions = torch.cat([torch.arange(s - n, s) for s, n in zip(seq, all_new)])
    return ForwardState(
        positions=positions, out_slots=torch.cat([pool.slots(i)[s - n :] for i, (s, n) in enumerate(zip(seq, all_new))]),
        b_req_idx=pool.b_req_idx, b_seq_len=pool.b_seq_len, req_to_token=pool.req_to_token, num_decode=num_decode,
        max_seq_len=max(seq), b_start=[sum(new_lens[:j]) for j in range(len(new_lens))], b_new_len=new_lens,
        b_prefix_len=[s - n for s, n in zip(seq[num_decode:], new_lens)],
    )


@pytest.mark.parametrize("dtype, int8", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_backend_matches_torch_attention_on_a_mixed_step(dtype: torch.dtype, int8: bool):
    """Decode rows, a whole prompt and prompt chunks with a prefix in the pool, in one step (in
    a float or an int8 pool)."""
    n_kv, group, head_dim = 2, 3, 64
    heads = n_kv * group
    torch_attn, triton_attn = TorchAttention(heads, n_kv, head_dim), TritonAttention(heads, n_kv, head_dim)
    triton_attn.split_len = 32
    gen = torch.Generator().manual_seed(3)
    seq_lens = [5, 77, 20, 9, 70]  # two decode rows, then chunks of 20 (whole), 4 and 33 tokens
    new_lens = [20, 4, 33]
    pool = make_int8_pool(seq_lens, n_kv, head_dim, seed=11) if int8 else make_pool(seq_lens, n_kv, head_dim, dtype,
                                                                                    seed=11)
    # Each back end gets its own state: begin_step stores back-end specific metadata in it.
    torch_state, triton_state = _state(pool, 2, new_lens), _state(pool, 2, new_lens)
    q = torch.randn(2 + sum(new_lens), heads, head_dim, generator=gen).to(dtype)
    kv = pool.layer()
    # The step's new k/v as the pool holds them. For an int8 pool these are the dequantized
    # values: torch attends the whole prompt (no prefix) to the k/v it is handed, Triton reads
    # them back quantized from the pool, and only the same values make the two comparable.
    k, v = kv.gather(torch_state.out_slots, dtype)
    pool_k, pool_v = pool.values(dtype)
    torch_attn.begin_step(torch_state)
    triton_attn.begin_step(triton_state)
    expected = torch_attn.forward(q, k, v, kv, torch_state).float()
    torch.testing.assert_close(triton_attn.forward(q, k, v, kv, triton_state).float(), expected, **ATTN_TOL[dtype])
    for i in range(len(seq_lens)):  # and torch itself against the reference
        rows = slice(i, i + 1) if i < 2 else slice(2 + sum(new_lens[: i - 2]), 2 + sum(new_lens[: i - 1]))
        n = rows.stop - rows.start
        want = reference_attention(q[rows], pool_k[pool.slots(i)], pool_v[pool.slots(i)], seq_lens[i] - n)
        torch.testing.assert_close(expected[rows], want, **ATTN_TOL[dtype], msg=f"request {i}")


# ---- layer ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rms_norm(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(7, 576, generator=gen)).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    out = TritonOps.rms_norm(x, w, 1e-6)
    expected = TorchOps.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    if dtype == torch.bfloat16:
        # Two roundings, each truncated by the interpreter (< 2^-7 relative) where torch rounds to
        # nearest (<= 2^-8): at most 3 * 2^-7 apart.
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=3 * 2**-7)
    else:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_in_place_on_fused_qkv_views(dtype: torch.dtype):
    n_tok, heads, kv_heads, head_dim = 9, 6, 2, 64
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(n_tok, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(n_tok, heads, head_dim), k.view(n_tok, kv_heads, head_dim)
    angles = torch.rand(n_tok, head_dim // 2, generator=gen) * 100
    cos, sin = angles.cos(), angles.sin()
    expected_q, expected_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    out_q, out_k = TritonOps.rotary(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(q, expected_q, **tol)
    torch.testing.assert_close(k, expected_k, **tol)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(dtype: torch.dtype):
    gate_up = (2 * torch.randn(5, 2 * 1536, generator=torch.Generator().manual_seed(6))).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    out = TritonOps.silu_and_mul(gate_up)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, F.silu(gate) * up, **tol)


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_write_kv_scatters_strided_kv_into_slots(slot_dtype: torch.dtype):
    n_tok, kv_heads, head_dim, pool_size = 11, 2, 64, 40
    gen = torch.Generator().manual_seed(7)
    kv = torch.randn(n_tok, 2 * kv_heads * head_dim, generator=gen).to(torch.float16)
    k, v = (t.view(n_tok, kv_heads, head_dim) for t in kv.chunk(2, dim=-1))
    slots = torch.randperm(pool_size, generator=gen)[:n_tok]
    k_cache, v_cache = torch.zeros(pool_size, kv_heads, head_dim, dtype=torch.float16), torch.zeros(
        pool_size, kv_heads, head_dim, dtype=torch.float16)
    expected_k, expected_v = k_cache.clone().index_copy_(0, slots, k), v_cache.clone().index_copy_(0, slots, v)
    TritonOps.write_kv(LayerKV(k_cache, v_cache), slots.to(slot_dtype), k, v)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_int8_matches_torch_quantization(dtype: torch.dtype):
    """Bit for bit the torch write (`quantize_kv`): int8 values, scales, and untouched slots;
    strided k/v, 3 heads and head_dim 48 (masked lanes), an all-zero row and exact ties."""
    n_tok, kv_heads, head_dim, pool_size = 9, 3, 48, 30
    gen = torch.Generator().manual_seed(16)
    kv = (4 * torch.randn(n_tok, 2 * kv_heads * head_dim, generator=gen)).to(dtype)
    k, v = (t.view(n_tok, kv_heads, head_dim) for t in kv.chunk(2, dim=-1))
    k[0, 1] = 0.0
    # absmax 127 makes the multiplier exactly 1, so x.5 values are ties (half to even: 2, -4, 0).
    k[1, 2] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5] * 8, dtype=dtype)
    slots = torch.randperm(pool_size, generator=gen)[:n_tok]

    def pool() -> LayerKV:
        g = torch.Generator().manual_seed(17)
        values = [torch.randint(-127, 128, (pool_size, kv_heads, head_dim), generator=g, dtype=torch.int8)
                  for _ in range(2)]
        return LayerKV(*values, *(torch.rand(pool_size, kv_heads, generator=g) for _ in range(2)))

    expected, got = pool(), pool()
    TorchOps.write_kv(expected, slots, k, v)
    TritonOps.write_kv(got, slots.to(torch.int32), k, v)
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.k_scale[slots[0], 1] == 0 and not got.k[slots[0], 1].any()


def test_kv_scales_must_match_the_pool():
    k = torch.zeros(4, 2, 8)
    slots = torch.arange(4)
    int8 = torch.zeros(4, 2, 8, dtype=torch.int8)
    scale = torch.zeros(4, 2)
    for caches, scales in [((int8, int8), (None, None)), ((k, k), (scale, scale)), ((int8, int8), (scale, None)),
                           ((int8, int8), (scale, scale.double()))]:
        with pytest.raises(ValueError):
            write_kv(*caches, slots, k, k, *scales)


# ---- end to end -----------------------------------------------------------------------------

def test_tiny_llama_greedy_tokens_match_torch_backend():
    # The parent test session's tiny Llama: building one here would import transformers' models (4 s).
    model_dir = os.environ["LIGHTSERVE_TEST_TINY_LLAMA"]
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (1, 5, 17, 70)]

    def engine(backend: str) -> ModelEngine:
        args = ServerArgs(device="cpu", data_type="float32", attention_backend=backend, max_total_token_num=400,
                          max_req_total_len=128, running_max_req_size=8)
        return ModelEngine(args, str(model_dir))

    expected_tokens, expected_logits = greedy_with_late_joiners(engine("torch"), prompts, 4, decode_steps=3)
    triton = engine("triton")
    assert triton.attention_backend == "triton"
    # Every layer op runs on Triton: attention, norms, rotary, SiLU-mul, KV write.
    assert triton.model.layers[0].ops is TritonOps
    # Decode of the longest request then merges two splits (64 positions each in the interpreter).
    triton.model.attention.split_len = 64
    tokens, logits = greedy_with_late_joiners(triton, prompts, 4, decode_steps=3)
    assert tokens == expected_tokens
    for got, want in zip(logits, expected_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert_kv_whole(triton)
