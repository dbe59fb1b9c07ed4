"""Logits of the engine's models against transformers on the same tiny random weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from lightserve.backend.attention import resolve_backend_name
from lightserve.backend.engine import ModelEngine
from lightserve.io_struct import Chunk, GenerateReq, SamplingParams, StepPlan
from lightserve.server_args import ServerArgs
from tests.engine_steps import assert_kv_whole, prefill, run_to_end
from tests.model_factory import build_tiny_model

PROMPT_LENS = [1, 5, 17, 33]
DECODE_STEPS = 4


def _backends() -> list[str]:
    names = ["torch"]
    try:
        resolve_backend_name("cpu_native", torch.device("cpu"), torch.float32)
        names.append("cpu_native")
    except (RuntimeError, ValueError):
        pass
    return names


def _engine(model_dir, backend: str, dtype: str = "float32") -> ModelEngine:
    args = ServerArgs(device="cpu", data_type=dtype, attention_backend=backend, max_total_token_num=1000,
                      max_req_total_len=128, running_max_req_size=8)
    return ModelEngine(args, str(model_dir))


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("family", ["llama", "llama_tied", "mistral", "qwen2"])
def test_prefill_and_decode_logits_match_transformers(tiny_model_dirs, family, backend, chunk):
    """Whole prompts, and prompts in chunks of 7 that attend to the earlier chunks in the pool."""
    model_dir = tiny_model_dirs[family]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = _engine(model_dir, backend)
    gen = torch.Generator().manual_seed(1)
    vocab = engine.cfg.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    reqs = [GenerateReq(req_id=i, prompt_ids=p, sampling=SamplingParams(max_new_tokens=60, temperature=0.0))
            for i, p in enumerate(prompts)]

    logits_of, _ = prefill(engine, reqs, chunk)
    logits = torch.stack([logits_of[r.req_id] for r in reqs])
    seqs = [list(p) for p in prompts]
    for step in range(DECODE_STEPS + 1):
        with torch.no_grad():
            expected = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4, msg=f"step {step}")
        if step == DECODE_STEPS:
            break
        # Feed the same next tokens to both sides (random ones: exercises more than greedy).
        nxt = torch.randint(3, vocab, (len(seqs),), generator=gen)
        for s, t in zip(seqs, nxt.tolist()):
            s.append(t)
        engine.decoding.last_ids = nxt
        logits = engine.forward(StepPlan(decode=True))
        engine.sample(logits)

    # Every KV slot held is one token of one request: prompt + fed tokens, nothing else.
    held = engine.mem.size - engine.mem.can_use_mem_size
    assert held == sum(len(s) for s in seqs)
    engine.release([r.req_id for r in reqs])
    assert_kv_whole(engine)


@pytest.mark.parametrize("backend", _backends())
def test_bfloat16_logits_close_to_float32(tmp_path, backend):
    # head_dim 64 and 3 query heads per kv head, as SmolLM2: the shapes the C kernels (bf16
    # prefill attention, fused layer ops) specialise for. bf16 must stay within bf16's own error
    # of the fp32 model through prefill and decode.
    model_dir = build_tiny_model("llama_tied", tmp_path / "llama_d64", hidden_size=384, num_attention_heads=6,
                                 num_key_value_heads=2, intermediate_size=256)
    gen = torch.Generator().manual_seed(2)
    reqs = [GenerateReq(req_id=i, prompt_ids=torch.randint(3, 320, (n,), generator=gen).tolist(),
                        sampling=SamplingParams(temperature=0.0)) for i, n in enumerate((37, 70, 5))]
    fp32_engine, bf16_engine = _engine(model_dir, "torch"), _engine(model_dir, backend, "bfloat16")
    (fp32, _), (bf16, _) = prefill(fp32_engine, reqs), prefill(bf16_engine, reqs)
    fp32, bf16 = (torch.stack([d[r.req_id] for r in reqs]) for d in (fp32, bf16))
    for step in range(DECODE_STEPS + 1):
        assert bf16.dtype == torch.float32
        assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max(), f"step {step}"
        nxt = torch.randint(3, 320, (len(reqs),), generator=gen)
        fp32_engine.decoding.last_ids = bf16_engine.decoding.last_ids = nxt
        fp32, bf16 = (e.forward(StepPlan(decode=True)) for e in (fp32_engine, bf16_engine))
        fp32_engine.sample(fp32)
        bf16_engine.sample(bf16)


def test_unsupported_architecture_is_named(tmp_path, tiny_model_dirs):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dirs["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*supported: .*LlamaForCausalLM"):
        _engine(bad, "torch")


def test_a_request_the_engine_cannot_serve_is_refused_alone_before_the_step(tiny_model_dirs):
    """Checks at admission, on every rank alike: the request gets an error output, takes no KV
    slot or table row, and the rest of the step runs."""
    from lightserve.io_struct import ImageItem

    engine = _engine(tiny_model_dirs["llama"], "torch")
    free_slots, free_rows = engine.mem.can_use_mem_size, engine.req_manager.can_use_req_size
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    bad = [
        # a text-only engine cannot serve images
        GenerateReq(req_id=1, prompt_ids=[5] * 10, sampling=sampling,
                    images=[ImageItem(md5="0" * 32, token_start=2, token_num=4, record_id=1)]),
        GenerateReq(req_id=2, prompt_ids=[5, 10**6], sampling=sampling),  # outside the vocabulary
        GenerateReq(req_id=3, prompt_ids=[5] * 7, sampling=SamplingParams(logprobs=10**6)),  # fails validate()
        GenerateReq(req_id=4, prompt_ids=[5] * 100, sampling=SamplingParams(max_new_tokens=100)),  # too long
    ]
    good = GenerateReq(req_id=0, prompt_ids=[4] * 7, sampling=sampling)
    plan = StepPlan(new_reqs=[good, *bad], chunks=[Chunk(r.req_id, len(r.prompt_ids)) for r in [good, *bad]])
    result = engine.step(plan)
    errors = {o.req_id: o.error for o in result.outs if o.error}
    assert set(errors) == {1, 2, 3, 4}, result.outs
    assert "image cache" in errors[1] and "vocabulary" in errors[2] and "logprobs" in errors[3]
    assert [o.req_id for o in result.outs if not o.error] == [0]
    run_to_end(engine)
    assert_kv_whole(engine)
    assert (engine.mem.can_use_mem_size, engine.req_manager.can_use_req_size) == (free_slots, free_rows)


def test_a_step_that_raises_frees_every_slot_and_row(tiny_model_dirs):
    """A step that fails part-way (here: more chunk tokens than the request has) leaves no
    state to trust: every request is dropped, all KV comes back, and the engine serves on."""
    engine = _engine(tiny_model_dirs["llama"], "torch")
    free_slots, free_rows = engine.mem.can_use_mem_size, engine.req_manager.can_use_req_size
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    prefill(engine, [GenerateReq(req_id=0, prompt_ids=[4] * 7, sampling=sampling)])
    with pytest.raises(ValueError, match="does not fit"):
        engine.step(StepPlan(new_reqs=[GenerateReq(req_id=1, prompt_ids=[4] * 5, sampling=sampling)],
                             chunks=[Chunk(1, 9)], decode=True))
    assert engine.num_running == 0
    assert (engine.mem.can_use_mem_size, engine.req_manager.can_use_req_size) == (free_slots, free_rows)
    prefill(engine, [GenerateReq(req_id=2, prompt_ids=[4] * 7, sampling=sampling)])  # still serves
    run_to_end(engine)
    assert_kv_whole(engine)
    assert engine.mem.can_use_mem_size == free_slots
