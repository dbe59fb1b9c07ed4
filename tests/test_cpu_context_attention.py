"""The C bf16 prefill attention against causal softmax attention computed in float64.

Its error must be that of bf16 itself: no larger than torch's own bf16 SDPA on the same inputs
(plus a little for the different summation order). Requests are packed without padding,
lengths straddle the kernel's 16-query and 32-key blocks, and q/k/v are strided views of one
fused qkv buffer, as the model passes them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightserve.backend import cpu_kernels

pytestmark = pytest.mark.skipif(
    not (cpu_kernels.available() and cpu_kernels.context_attention_supported()),
    reason="the C prefill attention needs the CPU kernels and AVX512-BF16",
)


def packed_case(lens: list[int], hq: int, hk: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lens)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=gen).to(torch.bfloat16)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d:].view(tokens, hk, d)
    starts = torch.tensor([0] + lens[:-1], dtype=torch.int64).cumsum(0)
    return q, k, v, starts, torch.tensor(lens, dtype=torch.int64)


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)[None].to(dtype)

    scale = q.shape[-1] ** -0.5
    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("hq, hk, d", [(9, 3, 64), (8, 2, 128), (4, 4, 96), (6, 1, 64)])
def test_matches_float64_as_closely_as_torch_bf16(hq, hk, d):
    lens = [1, 2, 15, 16, 17, 31, 32, 33, 100, 257]
    q, k, v, starts, b_len = packed_case(lens, hq, hk, d)
    out = cpu_kernels.context_attention(q, k, v, starts, b_len, d ** -0.5)
    for start, n in zip(starts.tolist(), lens):
        rows = slice(start, start + n)
        exact = causal(q[rows], k[rows], v[rows], torch.float64)
        torch_bf16_error = (causal(q[rows], k[rows], v[rows], torch.bfloat16).double() - exact).abs().max()
        our_error = (out[rows].double() - exact).abs().max()
        assert our_error <= torch_bf16_error * 1.5 + 1e-3, (n, float(our_error), float(torch_bf16_error))


def test_requests_do_not_see_each_other():
    # The same request alone and packed between others gives the same bits.
    q, k, v, starts, b_len = packed_case([40, 70, 25], 9, 3, 64, seed=1)
    packed = cpu_kernels.context_attention(q, k, v, starts, b_len, 0.125)
    alone = cpu_kernels.context_attention(q[40:110], k[40:110], v[40:110], torch.tensor([0]), torch.tensor([70]), 0.125)
    assert torch.equal(packed[40:110], alone)


def test_bitwise_independent_of_threads():
    q, k, v, starts, b_len = packed_case([300, 77], 9, 3, 64, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.context_attention(q, k, v, starts, b_len, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, cpu_kernels.context_attention(q, k, v, starts, b_len, 0.125))


@pytest.mark.parametrize("change, message", [
    (dict(q=lambda q: q.float()), "bfloat16"),
    (dict(k=lambda k: k[:, :1]), "do not match"),
    (dict(b_len=lambda n: n + 1), "inside"),
    (dict(b_len=lambda n: n * 0), "inside"),
    (dict(b_start=lambda s: s.int()), "int64"),
])
def test_bad_inputs_raise(change, message):
    args = dict(zip(("q", "k", "v", "b_start", "b_len"), packed_case([3, 4], 4, 2, 64)))
    for name, edit in change.items():
        args[name] = edit(args[name])
    with pytest.raises(ValueError, match=message):
        cpu_kernels.context_attention(**args, scale=0.125)


def test_heads_the_kernel_does_not_take_raise():
    # 17 query heads per kv head: more than the kernel's group limit (16).
    q, k, v, starts, b_len = packed_case([5], 17, 1, 64)
    assert not cpu_kernels.context_attention_fits(17, 1, 64) and cpu_kernels.context_attention_fits(16, 1, 64)
    with pytest.raises(ValueError, match="unsupported heads"):
        cpu_kernels.context_attention(q, k, v, starts, b_len, 0.125)
