"""Tests of the C decode-attention kernel that reads K/V through the token table in place.

The reference gathers each request's K/V through req_to_token and runs plain softmax attention
in float64. Slots are a random permutation of the pool, so nothing is contiguous by accident.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightserve.backend import cpu_kernels
from lightserve.backend.mem_manager import quantize_kv

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}"
)

# fp32: summation-order differences only. bf16: the output is rounded to bf16, so allow one
# unit in the last place (8 significant bits) plus a little for values near zero.
TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=2**-7)}


def make_case(lens: list[int], n_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
              seed: int = 0, spare_slots: int = 7, spare_cols: int = 5) -> dict:
    """A batch whose requests own disjoint slots scattered over the pool by a random permutation.

    The table has spare rows and columns; unused entries hold an out-of-range slot, so reading
    past b_seq_len makes the kernel fail instead of silently passing.
    """
    gen = torch.Generator().manual_seed(seed)
    n_slots = sum(lens) + spare_slots
    perm = torch.randperm(n_slots, generator=gen).to(torch.int32)
    batch = len(lens)
    n_rows = batch + 3
    req_to_token = torch.full((n_rows, max(lens) + spare_cols), n_slots + 1000, dtype=torch.int32)
    rows = torch.randperm(n_rows, generator=gen)[:batch].to(torch.int32)  # any row per entry
    start = 0
    for row, length in zip(rows.tolist(), lens):
        req_to_token[row, :length] = perm[start:start + length]
        start += length

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    return dict(
        q=randn(batch, n_kv_heads * group, head_dim),
        k_cache=randn(n_slots, n_kv_heads, head_dim),
        v_cache=randn(n_slots, n_kv_heads, head_dim),
        req_to_token=req_to_token,
        b_req_idx=rows,
        b_seq_len=torch.tensor(lens, dtype=torch.int32),
        scale=head_dim ** -0.5,
    )


def reference(q, k_cache, v_cache, req_to_token, b_req_idx, b_seq_len, scale) -> torch.Tensor:
    """Float64 attention of each entry's query over its first b_seq_len table positions."""
    group = q.shape[1] // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        slots = req_to_token[b_req_idx[b], : b_seq_len[b]].long()
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,lhd->hl", q[b].double(), k) * scale).softmax(dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v)
    return out


def assert_matches_reference(case: dict, out: torch.Tensor) -> None:
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    torch.testing.assert_close(out.double(), reference(**case), **TOLERANCES[case["q"].dtype])


RAGGED = [1, 2, 17, 130, 33, 64, 65, 31]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_ragged_gqa_matches_reference(dtype, head_dim, group):
    case = make_case(RAGGED, n_kv_heads=2, group=group, head_dim=head_dim, dtype=dtype, seed=group)
    assert_matches_reference(case, cpu_kernels.token_decode_attention(**case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 40])
def test_smollm2_shapes_small_and_large_batch(dtype, batch):
    # Small batches split work by kv head; large bf16 ones read all kv heads of a slot row at once.
    lens = torch.randint(1, 300, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    case = make_case(lens, n_kv_heads=3, group=3, head_dim=64, dtype=dtype, seed=batch)
    assert_matches_reference(case, cpu_kernels.token_decode_attention(**case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [72, 80, 96])
def test_other_head_dims(dtype, head_dim):
    # 72 takes the portable path, 80 and 96 the vector path with a run-time head_dim.
    case = make_case([5, 140, 1], n_kv_heads=2, group=2, head_dim=head_dim, dtype=dtype)
    assert_matches_reference(case, cpu_kernels.token_decode_attention(**case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 72])
def test_long_context_with_rising_scores(dtype, head_dim):
    # Positive queries and a K bias that grows along each context make the scores rise, so the
    # running max changes block after block and the online softmax must keep rescaling.
    lens = [1500, 700]
    case = make_case(lens, n_kv_heads=1, group=2, head_dim=head_dim, dtype=dtype)
    position = torch.zeros(case["k_cache"].shape[0])
    for row, length in zip(case["b_req_idx"].tolist(), lens):
        position[case["req_to_token"][row, :length].long()] = torch.arange(length) / length
    case["q"] = (case["q"].float().abs() + 0.5).to(dtype)
    case["k_cache"] = (case["k_cache"].float() + 0.2 * position.view(-1, 1, 1)).to(dtype)
    case["scale"] = 0.5
    assert_matches_reference(case, cpu_kernels.token_decode_attention(**case))


def test_shared_prefix_slots():
    # Two requests read the same prefix slots (prefix cache); a third shares nothing.
    case = make_case([50, 50, 20], n_kv_heads=2, group=3, head_dim=64, dtype=torch.float32)
    rtt, rows = case["req_to_token"], case["b_req_idx"].long()
    rtt[rows[1], :30] = rtt[rows[0], :30]
    assert_matches_reference(case, cpu_kernels.token_decode_attention(**case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_and_out(dtype):
    # q as a slice of a fused qkv output, k/v as halves of one [S, 2*Hkv, D] buffer, out given.
    case = make_case([9, 100, 33], n_kv_heads=2, group=2, head_dim=64, dtype=dtype)
    batch, n_q, dim = case["q"].shape
    qkv = torch.randn(batch, n_q + 4, dim).to(dtype)
    qkv[:, :n_q] = case["q"]
    kv = torch.cat([case["k_cache"], case["v_cache"]], dim=1)
    strided = dict(case, q=qkv[:, :n_q], k_cache=kv[:, :2], v_cache=kv[:, 2:])
    out = torch.full((batch + 1, n_q, dim), float("nan"), dtype=dtype)[1:]
    result = cpu_kernels.token_decode_attention(**strided, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_matches_reference(case, out)


def test_out_may_alias_q():
    case = make_case([12, 70], n_kv_heads=2, group=3, head_dim=64, dtype=torch.float32)
    expected = reference(**case)
    q = case["q"].clone()
    cpu_kernels.token_decode_attention(**dict(case, q=q), out=q)
    torch.testing.assert_close(q.double(), expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_independent_of_threads_and_batch(dtype):
    # Each head's arithmetic is fixed whatever the thread count or the rest of the batch, so a
    # request gets bit-identical attention alone or batched (needed for batch-invariant decoding).
    # The batch is big enough for the kernel to use several threads when torch has them.
    lens = torch.randint(1, 700, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    case = make_case(lens, n_kv_heads=3, group=3, head_dim=64, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = cpu_kernels.token_decode_attention(**case)
    finally:
        torch.set_num_threads(threads)
    batched = cpu_kernels.token_decode_attention(**case)
    assert torch.equal(single_thread, batched)
    for b in (0, 3, 12):
        alone = dict(case, q=case["q"][b:b + 1], b_req_idx=case["b_req_idx"][b:b + 1],
                     b_seq_len=case["b_seq_len"][b:b + 1])
        assert torch.equal(cpu_kernels.token_decode_attention(**alone)[0], batched[b])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    lens=st.lists(st.integers(1, 200), min_size=1, max_size=6),
    n_kv_heads=st.sampled_from([1, 2, 3, 4]),
    group=st.sampled_from([1, 2, 3, 4, 5, 8]),
    head_dim=st.sampled_from([16, 32, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(lens, n_kv_heads, group, head_dim, dtype, seed):
    case = make_case(lens, n_kv_heads, group, head_dim, dtype, seed=seed)
    assert_matches_reference(case, cpu_kernels.token_decode_attention(**case))


def test_empty_batch():
    case = make_case([3], n_kv_heads=1, group=1, head_dim=64, dtype=torch.float32)
    empty = dict(case, q=case["q"][:0], b_req_idx=case["b_req_idx"][:0], b_seq_len=case["b_seq_len"][:0])
    assert cpu_kernels.token_decode_attention(**empty).shape == (0, 1, 64)


def _case_for_errors() -> dict:
    return make_case([4, 9], n_kv_heads=2, group=2, head_dim=64, dtype=torch.float32)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(q=c["q"].double()), "float32 or bfloat16"),
        (lambda c: c.update(k_cache=c["k_cache"].bfloat16()), "dtypes differ"),
        (lambda c: c.update(q=c["q"].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous inner dims"),
        (lambda c: c.update(q=c["q"][:, :, :32].contiguous()), "head_dim"),
        (lambda c: c.update(q=c["q"][:, :3]), "multiple of kv heads"),
        (lambda c: c.update(v_cache=c["v_cache"][:-1]), "differ"),
        (lambda c: c.update(b_seq_len=c["b_seq_len"].long()), "int32"),
        (lambda c: c.update(b_req_idx=c["b_req_idx"][:1]), "shape"),
        (lambda c: c.update(req_to_token=c["req_to_token"].t()), "contiguous rows"),
        (lambda c: c.update(out=torch.empty(2, 4, 64, dtype=torch.bfloat16)), "out must be"),
        (lambda c: c["b_seq_len"].__setitem__(1, 0), "b_seq_len"),
        (lambda c: c["b_seq_len"].__setitem__(1, c["req_to_token"].shape[1] + 1), "b_seq_len"),
        (lambda c: c["b_req_idx"].__setitem__(0, c["req_to_token"].shape[0]), "b_req_idx"),
        (lambda c: c["b_req_idx"].__setitem__(0, -1), "b_req_idx"),
        (lambda c: c["b_seq_len"].__setitem__(0, 5), "slot outside"),  # reads a spare entry
        (lambda c: c["req_to_token"][c["b_req_idx"][1], 2].fill_(-1), "slot outside"),
    ],
)
def test_invalid_inputs_raise(change, message):
    case = _case_for_errors()
    change(case)
    with pytest.raises(ValueError, match=message):
        cpu_kernels.token_decode_attention(**case)


# ---------------------------------------------------------------- int8 pool

# The kernel is held to a float64 reference of the same quantized arithmetic: the pool's int8
# values times their scales, then exact softmax attention. With AVX512-VNNI and D a multiple of 64
# it quantizes q to 16 bits per head and each block's softmax weights to 15 bits, so its error is
# ~2^-15 of the largest terms rather than of each output element: rtol 1e-3 (the bound)
# plus an absolute 1e-4 for outputs near zero (unit-scale data: outputs are O(0.1..1)). A bf16
# output is also rounded to bf16, up to 2^-8 relative, on top of that.
INT8_TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.bfloat16: dict(atol=1e-4, rtol=1e-3 + 2**-8)}


def int8_case(case: dict) -> dict:
    """The case with its K/V pool quantized as the int8 pool stores it (`quantize_kv`)."""
    (k, k_scale), (v, v_scale) = quantize_kv(case["k_cache"]), quantize_kv(case["v_cache"])
    return dict(case, k_cache=k, v_cache=v, k_scale=k_scale, v_scale=v_scale)


def int8_reference(case: dict) -> torch.Tensor:
    """Float64 attention over the dequantized pool (int8 * scale, in float64)."""
    args = {name: case[name] for name in ("q", "req_to_token", "b_req_idx", "b_seq_len", "scale")}
    k = case["k_cache"].double() * case["k_scale"].double().unsqueeze(-1)
    v = case["v_cache"].double() * case["v_scale"].double().unsqueeze(-1)
    return reference(k_cache=k, v_cache=v, **args)


def assert_int8_matches_reference(case: dict, out: torch.Tensor) -> None:
    assert out.dtype == case["q"].dtype and out.shape == case["q"].shape
    torch.testing.assert_close(out.double(), int8_reference(case), **INT8_TOLERANCES[case["q"].dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 40])
def test_int8_pool_matches_reference_of_its_arithmetic(dtype, head_dim):
    # SmolLM2's GQA (9 q / 3 kv heads). 64 and 128 take the integer (VNNI) path where the CPU has
    # it, 80 the widening vector path, 40 the portable one.
    case = int8_case(make_case(RAGGED, n_kv_heads=3, group=3, head_dim=head_dim, dtype=dtype, seed=head_dim))
    assert_int8_matches_reference(case, cpu_kernels.token_decode_attention(**case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 40])
def test_int8_pool_small_and_large_batch_strided(dtype, batch):
    # One entry splits by kv head (a unit reads 64 bytes of a slot row), 40 read whole rows; q is
    # a slice of a fused qkv output and out is given.
    lens = torch.randint(1, 300, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    case = int8_case(make_case(lens, n_kv_heads=3, group=3, head_dim=64, dtype=dtype, seed=batch))
    qkv = torch.randn(batch, 15, 64).to(dtype)
    qkv[:, :9] = case["q"]
    out = torch.full((batch, 9, 64), float("nan"), dtype=dtype)
    result = cpu_kernels.token_decode_attention(**dict(case, q=qkv[:, :9]), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert_int8_matches_reference(case, out)


def test_int8_pool_with_zero_rows_and_rising_scores():
    # All-zero rows (scale 0) score 0 and add nothing; K rows that grow along the context make
    # the running max change block after block.
    lens = [300, 45]
    case = make_case(lens, n_kv_heads=1, group=4, head_dim=64, dtype=torch.float32)
    position = torch.zeros(case["k_cache"].shape[0])
    for row, length in zip(case["b_req_idx"].tolist(), lens):
        position[case["req_to_token"][row, :length].long()] = torch.arange(length) / length
    case["q"] = case["q"].abs() + 0.5
    case["k_cache"] = case["k_cache"] + 0.3 * position.view(-1, 1, 1)
    zero = case["req_to_token"][case["b_req_idx"][0], 10:20].long()
    case["k_cache"][zero] = 0
    case["v_cache"][zero] = 0
    case = int8_case(case)
    assert not case["k_scale"][zero].any()
    assert_int8_matches_reference(case, cpu_kernels.token_decode_attention(**case))


@pytest.mark.parametrize("head_dim", [64, 40])
def test_int8_pool_bitwise_independent_of_threads_and_batch(head_dim):
    lens = torch.randint(1, 700, (24,), generator=torch.Generator().manual_seed(6)).tolist()
    case = int8_case(make_case(lens, n_kv_heads=3, group=3, head_dim=head_dim, dtype=torch.bfloat16))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = cpu_kernels.token_decode_attention(**case)
    finally:
        torch.set_num_threads(threads)
    batched = cpu_kernels.token_decode_attention(**case)
    assert torch.equal(single_thread, batched)
    for b in (0, 7):  # alone, an entry's units split by kv head: same bits
        alone = dict(case, q=case["q"][b:b + 1], b_req_idx=case["b_req_idx"][b:b + 1],
                     b_seq_len=case["b_seq_len"][b:b + 1])
        assert torch.equal(cpu_kernels.token_decode_attention(**alone)[0], batched[b])


def _int8_case_for_errors() -> dict:
    return int8_case(make_case([4, 9], n_kv_heads=2, group=2, head_dim=64, dtype=torch.float32))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(v_scale=None), "needs both k_scale and v_scale"),
        (lambda c: c.update(k_cache=c["k_cache"].float(), v_cache=c["v_cache"].float()), "must be int8"),
        (lambda c: c.update(k_scale=c["k_scale"].double()), "k_scale must be a contiguous float32"),
        (lambda c: c.update(v_scale=c["v_scale"][:, :1]), "v_scale must be a contiguous float32"),
        (lambda c: c.update(k_scale=c["k_scale"].t().contiguous().t()), "k_scale must be a contiguous"),
        (lambda c: c.update(k_cache=c["k_cache"][:, :, :32].contiguous()), "differ"),
        (lambda c: c["req_to_token"][c["b_req_idx"][1], 2].fill_(-1), "slot outside"),
    ],
)
def test_int8_invalid_inputs_raise(change, message):
    case = _int8_case_for_errors()
    change(case)
    with pytest.raises(ValueError, match=message):
        cpu_kernels.token_decode_attention(**case)


# ---------------------------------------------------------------- building and fallback

_PROBE = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
    from lightserve.backend import cpu_kernels
    print("available", cpu_kernels.available(), cpu_kernels.available())
    print("reason", cpu_kernels.unavailable_reason())
    """
)


def _probe(home: Path, path: str | None = None, cc: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, LIGHTSERVE_HOME=str(home))
    env.pop("CC", None)
    if path is not None:
        env["PATH"] = path
    if cc is not None:
        env["CC"] = cc
    return subprocess.Popen([sys.executable, "-c", _PROBE], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_build_is_cached_and_safe_under_concurrency(tmp_path):
    # Two processes build into an empty cache at once: both load, one file results, no temp
    # files are left, and a later process reuses the file without rebuilding. The compiler is gcc
    # at -O0 (a last -O wins): what is tested is the cache, and -O3 takes ~10 s twice over here.
    quick_gcc = tmp_path / "quick-gcc"
    quick_gcc.write_text('#!/bin/sh\nexec gcc "$@" -O0\n')
    quick_gcc.chmod(0o755)
    procs = [_probe(tmp_path, cc=str(quick_gcc)) for _ in range(2)]
    for proc in procs:
        output = proc.communicate(timeout=120)[0]
        assert "available True True" in output, output
    (built,) = (tmp_path / "kernels").iterdir()
    assert built.name.startswith("cpu_kernels-") and built.suffix == ".so"
    mtime = built.stat().st_mtime_ns
    output = _probe(tmp_path, cc=str(quick_gcc)).communicate(timeout=120)[0]
    assert "available True True" in output, output
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]
    assert built.stat().st_mtime_ns == mtime


def test_unavailable_without_compiler(tmp_path):
    output = _probe(tmp_path / "home", path=str(tmp_path)).communicate(timeout=120)[0]
    assert "available False False" in output, output
    assert "'gcc' not found" in output
    assert output.count("LOG ") == 1, output  # the reason is logged once


def test_unavailable_when_compilation_fails(tmp_path):
    # A compiler that reports a version and then fails, as a broken toolchain would; chosen with
    # $CC (with an extra word, as make allows), so it is not gcc that runs.
    fake = tmp_path / "bin" / "mycc"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\ncase "$2" in --version) echo "mycc 12.2.0";; *) echo "error: broken $1" >&2; exit 1;; esac\n'
    )
    fake.chmod(0o755)
    output = _probe(tmp_path / "home", path=str(fake.parent), cc="mycc -DEXTRA").communicate(timeout=120)[0]
    assert "available False False" in output, output
    assert "error: broken -DEXTRA" in output and "mycc" in output
    assert output.count("LOG ") == 1, output
    assert not list((tmp_path / "home" / "kernels").iterdir())  # no partial build left behind


def test_wrapper_raises_when_unavailable(tmp_path):
    script = _PROBE + textwrap.dedent(
        """
        import torch
        one = torch.ones(1, dtype=torch.int32)
        try:
            cpu_kernels.token_decode_attention(torch.zeros(1, 1, 8), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8),
                                               torch.zeros(1, 1, dtype=torch.int32), one - 1, one, 1.0)
        except RuntimeError as e:
            print("raised", e)
        """
    )
    env = dict(os.environ, LIGHTSERVE_HOME=str(tmp_path / "home"), PATH=str(tmp_path))
    output = subprocess.run([sys.executable, "-c", script], env=env, text=True, capture_output=True,
                            timeout=120).stdout
    assert "raised CPU kernels unavailable" in output, output
