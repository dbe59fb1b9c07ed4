"""The real SmolLM2-135M-Instruct: fp32 greedy output token-exact with transformers `generate`."""

from __future__ import annotations

import pytest
import torch
import transformers

from lightserve.backend.engine import ModelEngine
from lightserve.io_struct import GenerateReq, SamplingParams
from lightserve.server_args import ServerArgs
from tests.engine_steps import assert_kv_whole, decode, prefill, run_to_end

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a GPU is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def hf_outputs(hf_smollm2, prompts) -> list[list[int]]:
    model = hf_smollm2
    outs = []
    with torch.no_grad():
        for p in prompts:
            seq = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0]
            outs.append(seq[len(p):].tolist())
    return outs


def test_joining_a_running_batch_matches_transformers(smollm2_dir, prompts, hf_outputs):
    """Half the requests start first; the rest join after a few decode steps, their prompts
    computed in chunks of 7 tokens per request per step beside the decode rows."""
    chunk = 7
    args = ServerArgs(device="cpu", data_type="float32", max_total_token_num=4096, max_req_total_len=512,
                      running_max_req_size=16)
    engine = ModelEngine(args, str(smollm2_dir))
    reqs = [GenerateReq(req_id=i, prompt_ids=p, sampling=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))
            for i, p in enumerate(prompts)]
    got: dict[int, list[int]] = {i: [] for i in range(len(reqs))}

    def collect(outs):
        for o in outs:
            got[o.req_id].append(o.token_id)

    collect(prefill(engine, reqs[:3], chunk)[1])
    for _ in range(5):
        collect(decode(engine))
    collect(prefill(engine, reqs[3:], chunk, decode=True)[1])
    collect(run_to_end(engine))

    for i, expected in enumerate(hf_outputs):
        assert got[i] == expected, f"prompt {i}: {QUESTIONS[i]!r}"
    assert_kv_whole(engine)


@pytest.mark.parametrize("chunk", [1, 64])
def test_scheduler_with_chunked_prefill_matches_transformers(smollm2_dir, prompts, hf_outputs, chunk):
    """The real scheduler with a step budget of 1, 7 or 64 tokens: prompts are cut at every
    size, and requests join while others are part-way through their prompts."""
    from lightserve import LLM

    llm = LLM(str(smollm2_dir), data_type="float32", max_total_token_num=4096, max_req_total_len=512,
              chunked_prefill_size=chunk)
    outs = llm.generate(prompts[:2] if chunk == 1 else prompts, SamplingParams(max_new_tokens=NEW_TOKENS,
                                                                               temperature=0.0))
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == hf_outputs[i], f"prompt {i}: {QUESTIONS[i]!r}"
    assert_kv_whole(llm.engine, flush=False)
    llm.reset_prefix_cache()
    assert llm.engine.mem.can_use_mem_size == llm.engine.mem.size


def test_llm_answers_paris(smollm2_dir, tokenizer):
    from lightserve import LLM

    llm = LLM(str(smollm2_dir), data_type="float32", max_total_token_num=2048, max_req_total_len=512)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                           tokenize=False)
    out = llm.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0.0))[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "eos_token"
