"""W8A8 linear layers and the int8 KV pool: kernels against the reference arithmetic
(`backend/quant.py`), and whole models against transformers within quantization's error."""

from __future__ import annotations

import pytest
import torch
import transformers

from lightserve.backend import quant
from lightserve.backend.cpu_kernels import build, int8_ops
from lightserve.backend.engine import ModelEngine
from lightserve.backend.models.linear import Int8Linear, LinearFactory, hadamard, int_mm, residual_rotation
from lightserve.backend.parallel import SINGLE
from lightserve.io_struct import GenerateReq, SamplingParams
from lightserve.server_args import ServerArgs
from tests.engine_steps import assert_kv_whole, prefill, run_to_end

needs_c = pytest.mark.skipif(not build.available(), reason="C kernels unavailable")


def _rows(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Activations with a row stride (a view into a wider tensor), one all-zero row, outliers."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, cols + 24, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    wide[1] = 0
    wide[2, 3] = 90.0
    return wide.to(dtype)[:, 8 : 8 + cols]


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [576, 41])  # vector path, and a scalar tail
def test_c_quantize_equals_reference_bit_for_bit(dtype, cols):
    x = _rows(7, cols, dtype, seed=cols)
    q, scale = int8_ops.quantize_rows(x)
    ref_q, ref_scale = quant.quantize_symmetric(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    assert torch.equal(int8_ops.row_absmax(x), quant.row_absmax(x))
    assert int(q[1].abs().max()) == 0 and float(scale[1]) == 0.0
    # A given absmax (the whole row's, at tp > 1) replaces the slice's own.
    wider = quant.row_absmax(x) * 2
    q2, scale2 = int8_ops.quantize_rows(x, wider)
    ref_q2, ref_scale2 = quant.quantize_symmetric(x, wider)
    assert torch.equal(q2, ref_q2) and torch.equal(scale2, ref_scale2)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_c_dequantize_equals_reference_bit_for_bit(dtype, with_bias):
    gen = torch.Generator().manual_seed(5)
    acc = torch.randint(-2**20, 2**20, (9, 70), generator=gen, dtype=torch.int32)
    x_scale, w_scale = torch.rand(9, generator=gen) / 50, torch.rand(70, generator=gen) / 50
    bias = torch.randn(70, generator=gen).to(dtype) if with_bias else None
    out = int8_ops.dequantize_rows(acc, x_scale, w_scale, bias, dtype)
    assert torch.equal(out, quant.dequantize_acc(acc, x_scale, w_scale, bias, dtype))


@needs_c
def test_c_int8_ops_reject_bad_input():
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        int8_ops.quantize_rows(torch.ones(2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="absmax"):
        int8_ops.quantize_rows(torch.ones(2, 8), torch.ones(3))
    with pytest.raises(ValueError, match="int32"):
        int8_ops.dequantize_rows(torch.ones(2, 8), torch.ones(2), torch.ones(8), None, torch.float32)
    with pytest.raises(ValueError, match="w_scale"):
        int8_ops.dequantize_rows(torch.ones(2, 8, dtype=torch.int32), torch.ones(2), torch.ones(7), None,
                                 torch.float32)


def test_int_mm_is_exact():
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (5, 200), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (200, 24), generator=gen, dtype=torch.int8)
    assert torch.equal(int_mm(a, b), (a.long() @ b.long()).int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_float64_reference_of_its_arithmetic(dtype):
    """The layer computes exactly the quantized product: within 1e-3 of the same arithmetic in
    float64 (fp32 output), or within bf16's rounding of it (bf16 output, 2^-8 relative)."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(96, 576, generator=gen) / 24
    bias = torch.randn(96, generator=gen)
    layer = Int8Linear(weight, bias, dtype, torch.device("cpu"))
    x = (torch.randn(2, 5, 576, generator=gen) * 3).to(dtype)
    xq, xs = quant.quantize_symmetric(x.reshape(10, 576))
    wq, ws = quant.quantize_symmetric(weight)  # from the checkpoint's precision, as the layer does
    expected = (xq.double() @ wq.double().T) * xs.double()[:, None] * ws.double() + bias.to(dtype).double()
    out = layer(x)
    assert out.shape == (2, 5, 96) and out.dtype == dtype
    rtol = 1e-3 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out.reshape(10, 96).double(), expected, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("n", [576, 960, 2048, 3584])  # SmolLM2 135M / 360M, Llama 3.2 1B, Qwen2 7B
def test_residual_rotation_is_a_randomized_hadamard_matrix(n):
    h = hadamard(n)
    assert h is not None and torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = residual_rotation(n, SINGLE).double()
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(residual_rotation(n, SINGLE), residual_rotation(n, SINGLE).clone())  # fixed


def test_factory_flags_are_checked():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="--quantize_lm_head needs --quantization w8a8"):
        LinearFactory(SINGLE, torch.bfloat16, cpu, "none", quantize_lm_head=True)
    with pytest.raises(ValueError, match="unknown --quantization 'int4'"):
        LinearFactory(SINGLE, torch.bfloat16, cpu, "int4")
    with pytest.raises(ValueError, match="unknown --kv_cache_dtype 'fp8'"):
        ModelEngine(ServerArgs(device="cpu", kv_cache_dtype="fp8", max_total_token_num=100), "unused")


def _engine(model_dir, backend: str, **flags) -> ModelEngine:
    args = ServerArgs(device="cpu", data_type="float32", attention_backend=backend, max_total_token_num=1000,
                      max_req_total_len=128, running_max_req_size=8, **flags)
    return ModelEngine(args, str(model_dir))


QUANTIZED = [dict(quantization="w8a8"), dict(kv_cache_dtype="int8"),
             dict(quantization="w8a8", quantize_lm_head=True, kv_cache_dtype="int8")]


@pytest.mark.parametrize("flags", QUANTIZED, ids=lambda f: "+".join(f"{k}={v}" for k, v in f.items()))
def test_quantized_engine_stays_close_to_transformers(tiny_model_dirs, flags):
    """Prompts whole and in chunks (the chunks read their prefix back from the pool, int8 when it
    is), then decode: the logits stay within a few percent of the float model, and the pool is
    whole afterwards."""
    model_dir = tiny_model_dirs["llama"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = _engine(model_dir, "torch", **flags)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, engine.cfg.vocab_size, (n,), generator=gen).tolist() for n in (6, 29)]
    reqs = [GenerateReq(req_id=i, prompt_ids=p, sampling=SamplingParams(max_new_tokens=5, temperature=0.0))
            for i, p in enumerate(prompts)]
    logits_of, outs = prefill(engine, reqs[:1])
    more_logits, more_outs = prefill(engine, reqs[1:], chunk=8, decode=True)
    logits_of.update(more_logits)
    with torch.no_grad():
        for r in reqs:
            expected = hf(torch.tensor([r.prompt_ids])).logits[0, -1]
            error = (logits_of[r.req_id] - expected).norm() / expected.norm()
            assert error < 0.05, f"request {r.req_id}: relative error {float(error):.4f}"
    outs += more_outs + run_to_end(engine)
    assert sum(o.finish_reason is not None for o in outs) == len(reqs)
    assert_kv_whole(engine)
