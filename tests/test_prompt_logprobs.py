"""Prompt logprobs through the API, against transformers on the same weights.

TGI's `decoder_input_details` (`details.prefill`) and OpenAI completions' `echo` with `logprobs`
score every prompt token: log P(token_i | tokens_<i), the log-softmax of the raw logits. The
shared tiny server runs in float32 with chunked prefill (256 tokens per step), so a prompt of
300 tokens is scored over two chunks; transformers' float32 logits agree to ~1e-6 there, and the
tolerance leaves room for the different summation orders of attention.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import torch
import transformers

from lightserve import LLM, SamplingParams
from lightserve.backend.prompt_scores import SCORE_ROWS
from tests.test_server_e2e import wait_pool_free

ATOL = 1e-4  # float32 server against float32 transformers
MODEL = "llama"  # the tiny model's directory name
# About 300 tokens: more than one chunk of the server's default 256-token step budget.
LONG_TEXT = " ".join(f"River {i} flows into the sea near town {i * 7 % 13}." for i in range(25))


@pytest.fixture(scope="module")
def tokenizer(tiny_served_model):
    return transformers.AutoTokenizer.from_pretrained(tiny_served_model)


@pytest.fixture(scope="module")
def reference(tiny_served_model):
    """log_softmax of transformers' float32 logits: [positions, vocab] for a list of token ids."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_served_model, dtype=torch.float32).eval()

    def log_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    return log_probs


def next_token_logprobs(log_probs: torch.Tensor, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1."""
    return log_probs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def completion(url: str, **fields: Any) -> dict:
    r = post(url, "/v1/completions", {"model": MODEL, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def prefill(url: str, inputs: str, **parameters: Any) -> list[dict]:
    r = post(url, "/generate", {"inputs": inputs, "parameters": {"decoder_input_details": True, **parameters}})
    assert r.status_code == 200, r.text
    return r.json()["details"]["prefill"]


def test_tgi_prefill_over_several_chunks_equals_transformers(tiny_server, tokenizer, reference) -> None:
    ids = tokenizer(LONG_TEXT).input_ids
    assert len(ids) > 256  # two chunks
    entries = prefill(tiny_server.url, LONG_TEXT, max_new_tokens=2)  # no `details`: implied
    assert [e["id"] for e in entries] == ids
    assert [e["text"] for e in entries] == [tokenizer.decode([t]) for t in ids]
    assert entries[0]["logprob"] is None  # TGI's way: the first token has no context
    expected = next_token_logprobs(reference(ids), ids)
    assert [e["logprob"] for e in entries[1:]] == pytest.approx(expected, abs=ATOL)


def test_whole_prompts_scored_in_pieces_beside_each_other(tiny_served_model, tokenizer, reference) -> None:
    """Without chunked prefill a prompt is one chunk: its rows are scored SCORE_ROWS at a time,
    and two scored prompts of one step (with different numbers of alternatives) keep theirs apart."""
    llm = LLM(str(tiny_served_model), data_type="float32", device="cpu", max_total_token_num=2000,
              max_req_total_len=1024, chunked_prefill_size=0)
    long_ids = tokenizer(LONG_TEXT + LONG_TEXT[:200]).input_ids
    short_ids = tokenizer("A short prompt beside it.").input_ids
    assert len(long_ids) > SCORE_ROWS + 1
    long_out, short_out = llm.generate([long_ids, short_ids], [SamplingParams(max_new_tokens=1, prompt_logprobs=0),
                                                               SamplingParams(max_new_tokens=1, prompt_logprobs=3)])
    for out, ids, n in ((long_out, long_ids, 0), (short_out, short_ids, 3)):
        log_probs = reference(ids)
        assert out.prompt_logprobs.logprobs == pytest.approx(next_token_logprobs(log_probs, ids), abs=ATOL)
        tops = out.prompt_logprobs.top_logprobs
        assert len(tops) == (len(ids) - 1 if n else 0)
        for row, expected in zip(tops, log_probs[:-1].topk(n, -1).values.tolist() if n else []):
            assert [lp for _, lp in row] == pytest.approx(expected, abs=ATOL)


def test_a_scored_prompt_takes_no_cache_hit_but_fills_the_cache(tiny_server, tokenizer, reference) -> None:
    """The cached positions would have no logits: a scored prompt computes them all again, and
    gets the same numbers; its KV still goes to the cache for the requests that only generate."""
    prompt = tokenizer("A scored prompt, asked for twice: " + LONG_TEXT[:400]).input_ids
    first = completion(tiny_server.url, prompt=prompt, echo=True, logprobs=1, max_tokens=1)
    plain = completion(tiny_server.url, prompt=prompt, max_tokens=1)
    assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 1  # the cache holds it
    again = completion(tiny_server.url, prompt=prompt, echo=True, logprobs=1, max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["choices"][0]["logprobs"] == first["choices"][0]["logprobs"]
    expected = next_token_logprobs(reference(prompt), prompt)
    assert first["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)] == pytest.approx(expected, abs=ATOL)


def test_openai_echo_logprobs_of_token_ids(tiny_server, tokenizer, reference) -> None:
    prompt = tokenizer(LONG_TEXT).input_ids  # token ids, as a quality benchmark sends them
    text = tokenizer.decode(prompt)
    answer = completion(tiny_server.url, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                        ignore_eos=True)
    choice = answer["choices"][0]
    plain = completion(tiny_server.url, prompt=prompt, max_tokens=3, ignore_eos=True)["choices"][0]
    assert choice["text"] == text + plain["text"]
    lp = choice["logprobs"]
    n = len(prompt)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n + 3
    assert lp["tokens"][:n] == [tokenizer.decode([t]) for t in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    log_probs = reference(prompt)
    assert lp["token_logprobs"][1:n] == pytest.approx(next_token_logprobs(log_probs, prompt), abs=ATOL)
    for i in range(1, n):  # the 2 most likely tokens, and the prompt's own token
        top = log_probs[i - 1].topk(2)
        expected = {tokenizer.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        expected[lp["tokens"][i]] = log_probs[i - 1, prompt[i]].item()
        assert lp["top_logprobs"][i].keys() == expected.keys()
        assert list(lp["top_logprobs"][i].values()) == pytest.approx(list(expected.values()), abs=ATOL)
    # The answer's tokens follow, as without echo.
    alone = completion(tiny_server.url, prompt=prompt, logprobs=2, max_tokens=3, ignore_eos=True)["choices"][0]
    assert lp["tokens"][n:] == alone["logprobs"]["tokens"]
    assert lp["token_logprobs"][n:] == pytest.approx(alone["logprobs"]["token_logprobs"], abs=ATOL)
    assert lp["text_offset"][n:] == [len(text) + o for o in alone["logprobs"]["text_offset"]]


def test_echo_with_max_tokens_0_scores_the_prompt_alone(tiny_server, tokenizer, reference) -> None:
    prompt = tokenizer("Only the prompt is scored here.").input_ids
    text = tokenizer.decode(prompt)
    answer = completion(tiny_server.url, prompt=[prompt, prompt[:1]], echo=True, logprobs=0, max_tokens=0)
    scored, single = answer["choices"]
    assert scored["text"] == text and scored["finish_reason"] == "length"
    assert scored["logprobs"]["token_logprobs"][1:] == pytest.approx(
        next_token_logprobs(reference(prompt), prompt), abs=ATOL)
    # logprobs 0: no alternatives, only each prompt token itself.
    assert scored["logprobs"]["top_logprobs"][1:] == [
        {t: v} for t, v in zip(scored["logprobs"]["tokens"][1:], scored["logprobs"]["token_logprobs"][1:])]
    assert single["logprobs"] == {"tokens": [tokenizer.decode(prompt[:1])], "token_logprobs": [None],
                                  "top_logprobs": [None], "text_offset": [0]}
    assert answer["usage"]["completion_tokens"] == 0
    assert answer["usage"]["prompt_tokens"] == len(prompt) + 1
    # Without logprobs: the prompt text alone.
    bare = completion(tiny_server.url, prompt="Echo me.", echo=True, max_tokens=0)["choices"][0]
    assert bare["text"] == "Echo me." and bare["logprobs"] is None and bare["finish_reason"] == "length"
    wait_pool_free(tiny_server.url)


def stream_completion(url: str, **fields: Any) -> list[dict]:
    chunks = []
    with httpx.stream("POST", url + "/v1/completions", timeout=120,
                      json={"model": MODEL, "temperature": 0, "stream": True, **fields}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("max_tokens", [3, 0])
def test_streamed_echo_logprobs_equal_the_plain_answer(tiny_server, max_tokens: int) -> None:
    fields = {"prompt": "The stream starts with the prompt", "echo": True, "logprobs": 2, "max_tokens": max_tokens}
    full = completion(tiny_server.url, **fields)["choices"][0]
    chunks = [c["choices"][0] for c in stream_completion(tiny_server.url, **fields)]
    assert chunks[0]["text"].startswith(fields["prompt"])  # the prompt comes with the first token
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert chunks[-1]["finish_reason"] == full["finish_reason"]
    joined = {key: [v for c in chunks for v in c["logprobs"][key]] for key in full["logprobs"]}
    assert joined["tokens"] == full["logprobs"]["tokens"]
    assert joined["text_offset"] == full["logprobs"]["text_offset"]
    assert joined["token_logprobs"][1:] == pytest.approx(full["logprobs"]["token_logprobs"][1:], abs=ATOL)


@pytest.mark.parametrize("path,body,status,message", [
    ("/generate_stream", {"inputs": "Hi", "parameters": {"decoder_input_details": True}}, 422,
     "decoder_input_details == true is not supported when streaming tokens"),
    ("/", {"inputs": "Hi", "stream": True, "parameters": {"decoder_input_details": True}}, 422,
     "decoder_input_details == true is not supported when streaming tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": True, "logprobs": 21}, 400, "`logprobs`"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": True, "logprobs": -1}, 400, "`logprobs`"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 0}, 400, "0 only with `echo`"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "echo": True, "max_tokens": -1}, 400, "`max_tokens`"),
], ids=["tgi-stream", "tgi-compat-stream", "logprobs-21", "logprobs-negative", "max-tokens-0-no-echo",
        "max-tokens-negative"])
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(tiny_server, path, body, status, message) -> None:
    r = post(tiny_server.url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in (error if isinstance(error, str) else error["message"])
    assert len(prefill(tiny_server.url, "Still serving?", max_new_tokens=1)) > 1
