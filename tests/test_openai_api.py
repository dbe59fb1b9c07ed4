"""The OpenAI-compatible API: request validation as pure functions, then the real server driven by
the real clients (`openai`, `huggingface_hub.InferenceClient`), the API key, and every example of
docs/api.md run against SmolLM2.

Two servers per module: a tiny random Llama with SmolLM2's tokenizer started with `--api_key`
(fast; every client test sends the key), and SmolLM2 itself for exact answers and the docs.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from lightserve.httpserver.errors import ApiError
from lightserve.httpserver.openai_params import (
    ChatCompletionRequest, CompletionRequest, chat_conversation, chat_top_logprobs, check_common, check_images,
    completion_max_tokens, completion_prompts, derive_seed, openai_sampling,
)
from lightserve.httpserver.params import parse_json
from lightserve.server_args import ServerArgs
from tests.server_harness import TINY_SERVER_FLAGS, ServerProcess

API_KEY = "sk-test-7f3a"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"
ARGS = ServerArgs(max_req_total_len=1000, max_new_tokens_default=64)


# ---- validation, without a server ------------------------------------------------------------


def chat_body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def refused(body: bytes, model: type = ChatCompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as info:
        req = parse_json(model, body)
        check_common(req)
        if isinstance(req, ChatCompletionRequest):
            chat_top_logprobs(req)
            check_images(chat_conversation(req.messages).images, ARGS)
        else:
            completion_prompts(req, vocab_size=100)
            completion_max_tokens(req)
    return info.value


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {"5": 10}), ("functions", [{"name": "f"}]), ("max_token", 5),
])
def test_unsupported_and_unknown_fields_are_refused_by_name(field: str, value: Any) -> None:
    err = refused(chat_body(**{field: value}))
    assert err.param == field and f"`{field}`" in err.message and err.status_code == 422  # 400 on /v1


@pytest.mark.parametrize("field,value", [("tools", []), ("tool_choice", "none"), ("response_format", {"type": "text"}),
                                         ("logit_bias", None), ("store", False), ("user", "u-1")])
def test_neutral_values_of_unsupported_fields_are_accepted(field: str, value: Any) -> None:
    parse_json(ChatCompletionRequest, chat_body(**{field: value}))


@pytest.mark.parametrize("fields,param", [
    ({"n": 0}, "n"), ({"n": 65}, "n"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}, "messages[0].tool_calls"),
])
def test_bad_chat_bodies_name_the_field(fields: dict, param: str) -> None:
    assert refused(chat_body(**fields)).param == param


def test_image_parts_are_accepted_in_shape_but_need_multimodal() -> None:
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
    req = parse_json(ChatCompletionRequest, chat_body(messages=[{"role": "user", "content": parts}]))
    conversation = chat_conversation(req.messages)
    assert conversation.messages == [{"role": "user", "content": "look"}]
    assert [(i.message, i.part, i.url) for i in conversation.images] == [(0, 1, "data:image/png;base64,AA==")]
    with pytest.raises(ApiError, match="images need --enable_multimodal"):
        check_images(conversation.images, ARGS)


def test_messages_for_the_template() -> None:
    req = parse_json(ChatCompletionRequest, chat_body(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
    ]))
    assert chat_conversation(req.messages).messages == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb", "name": "ann"}]


@pytest.mark.parametrize("prompt,expected", [
    ("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt: Any, expected: list) -> None:
    req = parse_json(CompletionRequest, json.dumps({"model": "m", "prompt": prompt}).encode())
    assert completion_prompts(req, vocab_size=100) == expected


@pytest.mark.parametrize("fields,param", [
    ({"prompt": []}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": [5, 100]}, "prompt"),
    ({"prompt": ["a"] * 33, "n": 2}, "prompt"), ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "logprobs": 21}, "logprobs"), ({"prompt": "a", "suffix": "z"}, "suffix"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
])
def test_bad_completion_bodies_name_the_field(fields: dict, param: str) -> None:
    assert refused(json.dumps({"model": "m", **fields}).encode(), CompletionRequest).param == param


def samplings(body: bytes, prompt_len: int = 10, **kw: Any) -> list:
    req = parse_json(ChatCompletionRequest, body)
    kw = {"max_tokens": req.max_tokens, "max_tokens_field": "max_tokens", "prompt_field": "messages", "logprobs": 0, **kw}
    return openai_sampling(req, prompt_len, ARGS, **kw)


def test_sampling_mapping_follows_openai_defaults() -> None:
    [sp] = samplings(chat_body())
    assert not sp.is_greedy and sp.temperature == 1.0 and sp.seed is not None  # OpenAI samples by default
    assert sp.max_new_tokens == ARGS.max_new_tokens_default
    [sp] = samplings(chat_body(temperature=0, stop="##", max_tokens=7, top_k=5, ignore_eos=True), logprobs=3)
    assert sp.is_greedy and sp.stop == ["##"] and sp.max_new_tokens == 7 and sp.top_k == 5 and sp.ignore_eos
    assert sp.logprobs == 3


def test_n_choices_get_distinct_reproducible_seeds() -> None:
    a = samplings(chat_body(n=4, seed=123))
    assert [s.seed for s in a] == [derive_seed(123, i) for i in range(4)] and a[0].seed == 123
    assert len({s.seed for s in a}) == 4 and all(0 <= s.seed < 2**63 for s in a)
    drawn = samplings(chat_body(n=3))
    assert len({s.seed for s in drawn}) == 3


@pytest.mark.parametrize("fields,prompt_len,param", [
    ({"max_tokens": 991}, 10, "max_tokens"), ({"max_tokens": 0}, 10, "max_tokens"), ({}, 1000, "messages"),
    ({"temperature": -1}, 10, "temperature"), ({"presence_penalty": 3}, 10, "presence_penalty"),
    ({"seed": -1}, 10, "seed"), ({"stop": [""]}, 10, "stop"),
])
def test_out_of_range_sampling_names_the_field(fields: dict, prompt_len: int, param: str) -> None:
    with pytest.raises(ApiError) as info:
        samplings(chat_body(**fields), prompt_len)
    assert info.value.param == param


# ---- the tiny server, with --api_key, through real clients -----------------------------------


@pytest.fixture(scope="module")
def keyed_server(tiny_served_model):
    with ServerProcess(tiny_served_model, *TINY_SERVER_FLAGS, "--api_key", API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def client(keyed_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_served_model):
    return AutoTokenizer.from_pretrained(tiny_served_model)


AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "llama"  # the tiny model's directory name
QUESTION = [{"role": "user", "content": "Tell me about rivers."}]


def tgi_generate(url: str, inputs: str, **parameters: Any) -> dict:
    r = httpx.post(url + "/generate", json={"inputs": inputs, "parameters": parameters}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_served_model(client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.code == "model_not_found"


def test_greedy_chat_equals_generate_on_the_templated_prompt(keyed_server, client, tokenizer) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12,
                                            extra_body={"ignore_eos": True})
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    expected = tgi_generate(keyed_server.url, prompt, max_new_tokens=12, ignore_eos=True, details=True)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected["generated_text"]
    assert choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == expected["details"]["prompt_tokens"] == len(tokenizer.encode(prompt))
    assert answer.usage.completion_tokens == 12 and answer.usage.total_tokens == answer.usage.prompt_tokens + 12


def test_chat_stream_has_role_first_usage_last_and_the_same_text(keyed_server, client) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=10,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    # On the wire: `[DONE]` is the last event; without include_usage no chunk has a `usage` key.
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 3, "stream": True}
    events = httpx.post(keyed_server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all("usage" not in json.loads(e[6:]) for e in events[:-2])


def test_completions_n_seed_and_prompt_lists(client) -> None:
    def complete(**kw: Any) -> list[str]:
        answer = client.completions.create(model=MODEL, max_tokens=8, extra_body={"ignore_eos": True}, **kw)
        assert [c.index for c in answer.choices] == list(range(len(answer.choices)))
        return [c.text for c in answer.choices]

    two = complete(prompt="Once upon a time", n=2, seed=11)
    assert len(two) == 2 and two[0] != two[1]  # independent answers
    assert complete(prompt="Once upon a time", n=2, seed=11) == two  # reproducible
    assert complete(prompt="Once upon a time", seed=11) == two[:1]  # answer 0 uses the seed itself
    assert complete(prompt="Once upon a time", n=2, seed=12) != two
    both = complete(prompt=["Once upon a time", "The weather"], n=2, seed=11)
    assert both[:2] == two and both[2:] == complete(prompt="The weather", n=2, seed=11)


def test_completion_token_prompts_and_echo(client, tokenizer) -> None:
    ids = tokenizer.encode("Hello there")
    by_text = client.completions.create(model=MODEL, prompt="Hello there", temperature=0, max_tokens=5)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=5, echo=True)
    assert by_ids.choices[0].text == "Hello there" + by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_stop_string_cuts_the_answer(client) -> None:
    kw = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 30, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kw).choices[0].text
    stop = full[10:14]
    cut = client.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs(client) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True,
                                            top_logprobs=3, extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and bytes(t.bytes).decode() == t.token
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == pytest.approx((t.token, t.logprob))
    legacy = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=5, logprobs=2,
                                       extra_body={"ignore_eos": True}).choices[0]
    lp = legacy.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen) for top, chosen in
               zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_streamed_logprobs_match_the_plain_answer(client) -> None:
    kw = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 5, "logprobs": True, "top_logprobs": 1,
          "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [t for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in plain]


def test_streamed_n_choices_each_end(client) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, seed=5, max_tokens=6, stream=True,
                                                 extra_body={"ignore_eos": True}))
    texts, finished = ["", "", ""], set()
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, seed=5, max_tokens=6,
                                           extra_body={"ignore_eos": True})
    assert texts == [c.message.content for c in plain.choices]


def test_errors_have_the_openai_shape(keyed_server, client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert info.value.param == "response_format.json_schema.schema" and "invalid JSON schema" in info.value.message
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    r = httpx.post(keyed_server.url + "/v1/chat/completions", content=b"{oops", headers=AUTH)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(keyed_server.url + "/v1/nowhere", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(keyed_server.url + "/generate", json={"inputs": ""}, headers=AUTH)  # TGI keeps its shape
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


def test_api_key(keyed_server) -> None:
    url = keyed_server.url
    assert httpx.get(url + "/health").status_code == 200  # open: load balancers probe it
    for path in ("/v1/models", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            assert httpx.get(url + path, headers=headers).status_code == 401
        assert httpx.get(url + path, headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert info.value.code == "invalid_api_key"
    r = httpx.post(url + "/generate", json={"inputs": "hi"})
    assert r.status_code == 401 and r.json()["error_type"] == "authentication"
    assert httpx.post(url + "/flush_cache").status_code == 401  # a flush costs every client its hits
    assert httpx.post(url + "/flush_cache", headers=AUTH).status_code == 200


def test_huggingface_inference_client_against_the_tgi_routes(keyed_server) -> None:
    hf = InferenceClient(base_url=keyed_server.url, api_key=API_KEY)
    prompt = "The river flows"
    expected = tgi_generate(keyed_server.url, prompt, max_new_tokens=8, details=True)
    assert hf.text_generation(prompt, max_new_tokens=8) == expected["generated_text"]
    details = hf.text_generation(prompt, max_new_tokens=8, details=True)
    assert [t.id for t in details.details.tokens] == [t["id"] for t in expected["details"]["tokens"]]
    assert details.details.finish_reason == expected["details"]["finish_reason"]
    streamed = list(hf.text_generation(prompt, max_new_tokens=8, stream=True))
    assert "".join(streamed) == expected["generated_text"]
    sampled = hf.text_generation(prompt, max_new_tokens=8, do_sample=True, seed=3, details=True)
    assert sampled.details.seed == 3
    assert hf.text_generation(prompt, max_new_tokens=8, do_sample=True, seed=3) == sampled.generated_text


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == name and s.labels == labels)


def test_leaving_an_n_stream_aborts_every_choice(keyed_server) -> None:
    url = keyed_server.url
    cancelled = metric(url, "lightserve_requests_total", outcome="cancelled")
    body = {"model": MODEL, "messages": QUESTION, "n": 3, "max_tokens": 800, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 12:
                break  # leave mid-stream: the connection closes here
    deadline = time.monotonic() + 10
    while (metric(url, "lightserve_kv_slots_used") or metric(url, "lightserve_running_requests")
           or metric(url, "lightserve_requests_total", outcome="cancelled") < cancelled + 3):
        assert time.monotonic() < deadline, "the choices were not aborted after the client left"
        time.sleep(0.05)
    assert metric(url, "lightserve_requests_total", outcome="cancelled") == cancelled + 3


# ---- SmolLM2: exact answers and the docs ------------------------------------------------------


def test_smollm2_chat_answers_like_generate(smol_server, smollm2_dir) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    client = openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, temperature=0, max_tokens=24)
    prompt = AutoTokenizer.from_pretrained(smollm2_dir).apply_chat_template(question, add_generation_prompt=True,
                                                                           tokenize=False)
    r = httpx.post(smol_server.url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 24}}, timeout=60)
    assert answer.choices[0].message.content == r.json()["generated_text"] == "The capital of France is Paris."
    assert answer.choices[0].finish_reason == "stop"


@dataclass
class HttpMessage:
    start: str  # request line or status line
    headers: dict[str, str]
    body: str


@dataclass
class Example:
    name: str
    needs_api_key: bool
    request: HttpMessage
    response: HttpMessage


_EXAMPLE = re.compile(r"<!-- example: ([\w-]+)( api_key)? -->\s*```http\n(.*?)```\s*```http\n(.*?)```", re.S)


def _http_message(text: str) -> HttpMessage:
    head, _, body = text.partition("\n\n")
    start, *header_lines = head.strip().splitlines()
    headers = dict(line.split(": ", 1) for line in header_lines)
    return HttpMessage(start, {k.lower(): v for k, v in headers.items()}, body.strip())


def docs_examples() -> list[Example]:
    """The request/response pairs of docs/api.md (see its introduction for the format)."""
    return [Example(m[1], bool(m[2]), _http_message(m[3]), _http_message(m[4])) for m in _EXAMPLE.finditer(DOCS.read_text())]


def send(example: Example, base_url: str) -> httpx.Response:
    method, path = example.request.start.split()
    return httpx.request(method, base_url + path, headers=example.request.headers,
                         content=example.request.body.encode() or None, timeout=120)


# Values that differ on every call, or with what earlier requests left in the prefix cache: only
# their type is compared.
_VARYING = {"id": str, "created": int, "cached_tokens": int}


def assert_matches(expected: Any, actual: Any, where: str = "") -> None:
    key = where.rsplit(".", 1)[-1]
    if key in _VARYING and isinstance(expected, _VARYING[key]):
        assert isinstance(actual, _VARYING[key]), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), f"{where}: keys {list(actual)}"
        for k in expected:
            assert_matches(expected[k], actual[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_matches(e, a, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=1e-3), where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def sse_data(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


def check_example(example: Example, r: httpx.Response) -> None:
    status = int(example.response.start.split()[1])
    assert r.status_code == status, r.text
    content_type = example.response.headers["content-type"]
    assert r.headers["content-type"].startswith(content_type)
    if content_type == "application/json":
        assert_matches(json.loads(example.response.body), r.json())
    elif content_type == "text/event-stream":
        expected, actual = sse_data(example.response.body), sse_data(r.text)
        assert len(actual) == len(expected), r.text
        for i, (e, a) in enumerate(zip(expected, actual)):
            if e == "[DONE]":
                assert a == e
            else:
                assert_matches(json.loads(e), json.loads(a), f"event{i}")
    else:  # /metrics: the documented families are exactly the served ones
        assert [line for line in r.text.splitlines() if line.startswith("# ")] == example.response.body.splitlines()


def test_docs_have_an_example_for_every_route() -> None:
    paths = {e.request.start for e in docs_examples()}
    for route in ("GET /health", "GET /metrics", "POST /flush_cache", "GET /v1/models", "POST /v1/completions", "POST /v1/chat/completions",
                  "POST /generate", "POST /generate_stream", "POST /"):
        assert route in paths


@pytest.mark.parametrize("example", docs_examples(), ids=lambda e: e.name)
def test_docs_example(example: Example, request) -> None:
    server = request.getfixturevalue("keyed_server" if example.needs_api_key else "smol_server")
    check_example(example, send(example, server.url))
