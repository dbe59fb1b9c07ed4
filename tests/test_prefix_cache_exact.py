"""The prefix cache changes nothing in what is generated.

The real SmolLM2: greedy fp32 output with the cache on is token-exact with transformers, for shared
prefixes of 1, 17 and 511 tokens, whole-prompt hits, a hit that ends part-way through an earlier
answer, requests with the same new prefix arriving in one step, and eviction under pool pressure. The tiny models: logits after a hit within tolerance of
transformers'. (tp=2 and LLaVA with different images are served with the cache on in
test_tensor_parallel.py and test_multimodal_server.py.)
"""

from __future__ import annotations

import pytest
import torch
import transformers

from lightserve import LLM, SamplingParams
from lightserve.io_struct import GenerateReq
from lightserve.prefix_cache.cache import request_key
from tests.engine_steps import assert_kv_whole, decode, prefill
from tests.test_model_vs_transformers import _engine

NEW_TOKENS = 8
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
        "father had taught him, and lit the great lamp that warned the fishing boats away from the rocks. ")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def hf(hf_smollm2):
    model = hf_smollm2
    memo: dict[tuple[int, ...], list[int]] = {}

    def generate(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in memo:
            with torch.no_grad():
                seq = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0]
            memo[tuple(prompt)] = seq[len(prompt):].tolist()
        return memo[tuple(prompt)]

    return generate


@pytest.fixture(scope="module")
def story(tokenizer) -> list[int]:
    """Ids of real text, long enough for the longest shared prefix."""
    ids = tokenizer(TEXT * 20).input_ids
    assert len(ids) > 600
    return ids


@pytest.fixture(scope="module")
def cache_on(smollm2_dir):
    return _llm(smollm2_dir)


@pytest.fixture
def llm(cache_on) -> LLM:
    """The cache-on LLM with an empty cache (every test starts from nothing cached)."""
    cache_on.reset_prefix_cache()
    assert cache_on.engine.prefix_cache.total_tokens == 0
    return cache_on


def _llm(smollm2_dir, pool: int = 4096) -> LLM:
    return LLM(str(smollm2_dir), data_type="float32", max_total_token_num=pool, max_req_total_len=1024)


def _question(tokenizer, text: str) -> list[int]:
    return tokenizer(" Question: " + text + " Answer:").input_ids


def _check(llm: LLM, hf, prompts: list[list[int]]) -> list:
    """Generate `prompts` in one call with the cache on; each answer must be transformers'.
    Returns the outputs (for their `num_cached_tokens`)."""
    outs = llm.generate(prompts, GREEDY)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == hf(prompts[i]), f"prompt {i}"
    return outs


@pytest.mark.parametrize("shared", [1, 17, 511])
def test_a_shared_prefix_is_reused_and_the_answers_are_exact(llm, tokenizer, hf, story, shared):
    prefix = story[:shared]
    first = prefix + _question(tokenizer, "Who climbed the stairs?")
    (out,) = _check(llm, hf, [first])
    assert out.num_cached_tokens == 0
    later = [prefix + _question(tokenizer, q) for q in ("What did he light?", "What did the lamp warn?")]
    for out in _check(llm, hf, later):
        assert shared <= out.num_cached_tokens < len(later[0])
    assert_kv_whole(llm.engine, flush=False)


def test_whole_prompt_hits_and_a_hit_inside_an_earlier_answer(llm, tokenizer, hf, story):
    prompt = story[:60] + _question(tokenizer, "Where were the rocks?")
    (first,) = _check(llm, hf, [prompt])
    answer = first.outputs[0].token_ids
    # The same prompt again: all of it but the last token, which must be computed for its logits.
    (again,) = _check(llm, hf, [prompt])
    assert again.num_cached_tokens == len(prompt) - 1
    # A next turn quoting the first 5 answer tokens: the hit runs 5 tokens into the cached answer.
    turn = prompt + answer[:5] + _question(tokenizer, "And then?")
    (follow,) = _check(llm, hf, [turn])
    assert follow.num_cached_tokens >= len(prompt) + 5
    # The whole answer (all but its last token were computed, so cached) and a new question.
    turn = prompt + answer + _question(tokenizer, "Why?")
    (follow,) = _check(llm, hf, [turn])
    assert follow.num_cached_tokens >= len(prompt) + len(answer) - 1


def test_requests_with_the_same_new_prefix_in_one_step(llm, tokenizer, hf, story):
    """Both compute the prefix (nothing was cached when they were admitted together); the cache
    keeps one copy and frees the other, and a third request then hits it."""
    prefix = story[100:300]
    both = [prefix + _question(tokenizer, q) for q in ("Who taught him?", "When did he climb?")]
    for out in _check(llm, hf, both):
        assert out.num_cached_tokens == 0
    assert llm.engine.prefix_cache.total_tokens < 2 * len(prefix)
    (third,) = _check(llm, hf, [prefix + _question(tokenizer, "What did he count?")])
    assert third.num_cached_tokens >= len(prefix)


def test_eviction_under_pool_pressure_keeps_answers_exact(smollm2_dir, tokenizer, hf, story):
    """A pool of 600 slots and prompts of 250 tokens: every later batch evicts what earlier ones
    cached, least recently used first, and every answer stays exact."""
    llm = _llm(smollm2_dir, pool=600)
    prompts = [story[i * 50 : i * 50 + 230] + _question(tokenizer, "Who?") for i in range(5)]
    _check(llm, hf, prompts[:2])
    _check(llm, hf, prompts[2:4])
    cache = llm.engine.prefix_cache
    assert cache.total_tokens <= 600 and cache.probe(prompts[0], len(prompts[0]))[0] < len(prompts[0]) - 1
    (recent,) = _check(llm, hf, [prompts[3]])  # the most recently used prompt survived
    assert recent.num_cached_tokens == len(prompts[3]) - 1
    _check(llm, hf, prompts[4:] + prompts[:1])
    assert_kv_whole(llm.engine, flush=False)


# ---- tiny models: logits after a hit -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_after_a_hit_match_transformers(tiny_model_dirs, family):
    """Request 0 runs and leaves its prompt and answer cached; requests sharing 1 and 17 tokens,
    its whole prompt, and its prompt plus part of its answer then start from their hits, and
    their logits at every computed position equal transformers' on the full sequence."""
    model_dir = tiny_model_dirs[family]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = _engine(model_dir, "torch")
    gen = torch.Generator().manual_seed(3)
    vocab = engine.cfg.vocab_size
    sampling = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    first = torch.randint(3, vocab, (40,), generator=gen).tolist()
    _, outs = prefill(engine, [GenerateReq(0, first, sampling)])
    answer = [o.token_id for o in outs + decode(engine) + decode(engine)]  # request 0 stays running for now
    engine.release([0])  # it leaves with its prompt and 2 answer tokens computed (and cached)
    tail = torch.randint(3, vocab, (9,), generator=gen).tolist()
    cases = [first[:1] + tail, first[:17] + tail, list(first), first + answer[:1] + tail]
    for i, prompt in enumerate(cases, start=1):
        req = GenerateReq(i, prompt, sampling)
        hit = engine.prefix_cache.probe(request_key(req), len(prompt) - 1)[0]
        assert hit == {1: 1, 2: 17, 3: 39, 4: 41}[i], (i, hit)
        logits, _ = prefill(engine, [req], cached=[hit])
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, atol=2e-4, rtol=1e-4, msg=f"case {i}")
        engine.release([i])
    assert_kv_whole(engine)
