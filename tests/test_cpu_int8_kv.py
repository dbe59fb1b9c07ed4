"""The int8 KV pool under the `cpu_native` back end against the `torch` one: one mixed step's
attention over a MemoryManager pool, then greedy generation by whole engines
(--kv_cache_dtype int8). The kernels themselves are held to references in test_cpu_kernels.py
(decode) and test_cpu_layer_ops.py (the quantizing write)."""

from __future__ import annotations

import pytest
import torch

from lightserve.backend import cpu_kernels
from lightserve.backend.attention import CpuNativeAttention, TorchAttention
from lightserve.backend.engine import ModelEngine
from lightserve.backend.forward_state import ForwardState
from lightserve.backend.mem_manager import MemoryManager
from lightserve.backend.models.torch_ops import TorchOps
from lightserve.server_args import ServerArgs
from tests.engine_steps import assert_kv_whole, greedy_with_late_joiners
from tests.model_factory import build_tiny_model

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}"
)

# Both back ends read the same int8 values; torch dequantizes them into q's dtype and runs SDPA,
# the kernel keeps fp32 (with VNNI: 16-bit q and 15-bit weights, ~1e-5 of the output scale).
# fp32: that difference. bf16: torch rounds every dequantized K/V element to bf16 before SDPA
# (here up to ~1.5 bf16 units from the exact result, against the kernel's half unit of output
# rounding), and prefill chunks meet two different bf16 kernels.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-3), torch.bfloat16: dict(atol=1e-2, rtol=2**-6)}


def _mixed_step(seq_lens: list[int], num_decode: int, new_lens: list[int], n_kv: int, head_dim: int,
                dtype: torch.dtype, seed: int) -> tuple[MemoryManager, ForwardState]:
    """An int8 pool (MemoryManager) whose requests' earlier positions were written through
    TorchOps.write_kv, and a step where the first `num_decode` requests decode one token and
    the others compute their last `new_lens[j]` positions (after a prefix when shorter than
    their length). Request slots come from alloc, a request's prompt at a time, and the step's
    own tokens' slots are written too (the layer writes K/V before attention)."""
    gen = torch.Generator().manual_seed(seed)
    mem = MemoryManager(sum(seq_lens) + 9, dtype, n_kv, head_dim, 1, kv_dtype=torch.int8)
    mem.alloc(9)  # the requests' slots do not start at 0
    req_to_token = torch.zeros(len(seq_lens) + 2, max(seq_lens) + 3, dtype=torch.int32)
    b_req_idx = torch.randperm(req_to_token.shape[0], generator=gen)[: len(seq_lens)].to(torch.int32)
    for row, n in zip(b_req_idx.tolist(), seq_lens):
        slots = mem.alloc(n)
        req_to_token[row, :n] = slots.to(torch.int32)
        k, v = (torch.randn(n, n_kv, head_dim, generator=gen).to(dtype) for _ in range(2))
        TorchOps.write_kv(mem.layers[0], slots, k, v)
    all_new = [1] * num_decode + new_lens
    out_slots = torch.cat([req_to_token[row, s - n : s].long() for row, s, n in zip(b_req_idx.tolist(), seq_lens, all_new)])
    state = ForwardState(
        positions=torch.cat([torch.arange(s - n, s) for s, n in zip(seq_lens, all_new)]), out_slots=out_slots,
        b_req_idx=b_req_idx, b_seq_len=torch.tensor(seq_lens, dtype=torch.int32), req_to_token=req_to_token,
        num_decode=num_decode, max_seq_len=max(seq_lens), b_start=[sum(new_lens[:j]) for j in range(len(new_lens))],
        b_new_len=new_lens, b_prefix_len=[s - n for s, n in zip(seq_lens[num_decode:], new_lens)],
    )
    return mem, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_native_matches_torch_attention_on_an_int8_pool(dtype):
    """Decode rows (the C kernel on the int8 pool), a whole prompt and a chunk after its prefix,
    in one step, with SmolLM2's heads: 9 q / 3 kv, head_dim 64."""
    n_kv, group, head_dim = 3, 3, 64
    heads = n_kv * group
    seq_lens = [5, 700, 33, 260, 90, 61]  # four decode rows, then chunks of 90 (whole) and 20 tokens
    new_lens = [90, 20]
    mem, state = _mixed_step(seq_lens, 4, new_lens, n_kv, head_dim, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(4 + sum(new_lens), heads, head_dim, generator=gen).to(dtype)
    # The step's new k/v as the layer computed them (already in the pool, quantized).
    k, v = (torch.randn(len(state.out_slots), n_kv, head_dim, generator=gen).to(dtype) for _ in range(2))
    kv = mem.layers[0]
    TorchOps.write_kv(kv, state.out_slots, k, v)
    results = []
    for attention in (TorchAttention(heads, n_kv, head_dim), CpuNativeAttention(heads, n_kv, head_dim)):
        step = ForwardState(**{**vars(state), "attn_meta": None})  # begin_step fills its own metadata
        attention.begin_step(step)
        results.append(attention.forward(q, k, v, kv, step).float())
    torch.testing.assert_close(results[1], results[0], **TOLERANCES[dtype])


def test_int8_pool_engine_greedy_tokens_match_torch_backend(tmp_path):
    # head_dim 64 and 3 q heads per kv head, as SmolLM2: the C decode's integer path.
    model_dir = build_tiny_model("llama", tmp_path / "llama", hidden_size=192, num_attention_heads=3,
                                 num_key_value_heads=1)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in (1, 40, 5, 70)]

    def engine(backend: str) -> ModelEngine:
        args = ServerArgs(device="cpu", data_type="float32", attention_backend=backend, kv_cache_dtype="int8",
                          max_total_token_num=400, max_req_total_len=128, running_max_req_size=8)
        return ModelEngine(args, str(model_dir))

    expected_tokens, expected_logits = greedy_with_late_joiners(engine("torch"), prompts, 6)
    native = engine("cpu_native")
    assert native.attention_backend == "cpu_native" and native.mem.kv_dtype == torch.int8
    tokens, logits = greedy_with_late_joiners(native, prompts, 6)
    assert tokens == expected_tokens
    # The two engines' hidden states differ in their last bits (C layer ops, the kernel's
    # arithmetic), so a few of the later tokens' int8 K/V elements land one step (1/127 of their
    # row's absmax) apart; here that moves logits by up to ~3e-3 (1e-3 of their norm).
    for got, want in zip(logits, expected_logits):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert_kv_whole(native)
