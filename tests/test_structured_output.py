"""Structured output and tool calls: grammars at the door, constrained decoding, the OpenAI shapes.

The tiny random-weight model is the hard case for constrained decoding: left to itself it writes
noise, so every answer that parses and validates does so because of the grammar. Its answers
must validate greedy and sampled, through a pause and recompute, chunked prefill and prefix-cache
hits. The real SmolLM2 answers the OpenAI client's `parse()` and tool round trips.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

from lightserve import LLM, SamplingParams
from lightserve.httpserver.errors import ApiError
from lightserve.httpserver.openai_params import ChatCompletionRequest
from lightserve.httpserver.params import parse_json
from lightserve.httpserver.structured import openai_grammar, tgi_grammar
from lightserve.httpserver.tools import ContentStream, parse_hermes, parse_tool_calls, plan_tools
from lightserve.io_struct import Grammar
from tests.engine_steps import assert_kv_whole
from tests.structured_cases import CHOICES, REGEXES, SCHEMAS, TOPICS, json_prompt

# ---- at the door: no server -----------------------------------------------------------------------


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_json(ChatCompletionRequest, json.dumps(body).encode())


@pytest.mark.parametrize("fields, kind", [
    ({"response_format": {"type": "json_object"}}, "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMAS["person"]}}}, "json_schema"),
    ({"guided_json": SCHEMAS["weather"]}, "json_schema"),
    ({"guided_regex": REGEXES["date"]}, "regex"),
    ({"guided_choice": CHOICES}, "choice"),
    ({"guided_grammar": 'start: "yes" | "no"'}, "lark"),
])
def test_each_spelling_gives_one_grammar(fields: dict, kind: str) -> None:
    assert openai_grammar(chat(**fields)).kind == kind
    assert openai_grammar(chat(response_format={"type": "text"})) is None


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format.json_schema", "needs"),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"guided_regex": ""}, "guided_regex", "empty"),
    ({"guided_regex": "a" * 70_000}, "guided_regex", "longer than"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar", "unknown name"),
    ({"guided_json": SCHEMAS["review"], "guided_regex": "x"}, "guided_regex", "only one of"),
])
def test_bad_grammars_are_refused_naming_the_problem(fields: dict, param: str, words: str) -> None:
    with pytest.raises(ApiError) as info:
        openai_grammar(chat(**fields))
    assert info.value.status_code == 422 and info.value.param == param and words in info.value.message


def test_tgi_grammar_forms() -> None:
    assert tgi_grammar({"type": "json", "value": SCHEMAS["review"]}).kind == "json_schema"
    assert tgi_grammar({"type": "json", "value": json.dumps(SCHEMAS["review"])}).kind == "json_schema"
    assert tgi_grammar({"type": "regex", "value": REGEXES["email"]}) == Grammar("regex", REGEXES["email"])
    for bad in ({"type": "json"}, {"type": "regex", "value": 5}, "json", {"type": "json", "value": 3}):
        with pytest.raises(ApiError):
            tgi_grammar(bad)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                                                "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


def test_tool_choice_plans() -> None:
    req = chat(tools=[WEATHER_TOOL, TIME_TOOL])
    assert plan_tools(req.tools, req.tool_choice, None).mode == "auto"
    required = plan_tools(req.tools, "required", False)
    assert required.grammar is not None and json.loads(required.grammar.text)["maxItems"] == 1
    named = plan_tools(chat(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}).tools,
                       chat(tool_choice={"type": "function", "function": {"name": "get_weather"}}).tool_choice, None)
    assert named.mode == "named" and json.loads(named.grammar.text)["required"] == ["city"]
    for tools, choice, words in [([WEATHER_TOOL], {"type": "function", "function": {"name": "nope"}}, "no tool is named"),
                                 ([WEATHER_TOOL, WEATHER_TOOL], "auto", "unique"), (None, "required", "needs `tools`")]:
        req = chat(**({"tools": tools} if tools else {}), tool_choice=choice)
        with pytest.raises(ApiError, match=words):
            plan_tools(req.tools, req.tool_choice, None)
    bad = dict(WEATHER_TOOL, function=dict(WEATHER_TOOL["function"], parameters={"type": "objekt"}))
    with pytest.raises(ApiError, match="Invalid type"):
        plan_tools(chat(tools=[bad]).tools, "auto", None)


def test_hermes_calls_are_parsed_and_the_rest_is_content() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}')  # the last block lacks its closing tag
    content, calls = parse_hermes(text)
    assert content.strip() == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    assert parse_hermes("no calls <tool_call>not json</tool_call>") == ("no calls <tool_call>not json</tool_call>", [])
    # The other families' forms: Mistral's tagged list, a bare Llama-3 call; plain JSON is content.
    for text in ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}]',
                 '{"name": "get_time", "parameters": {"zone": "UTC"}}'):
        content, calls = parse_tool_calls(text)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "UTC"})]
    assert parse_tool_calls('{"zone": "UTC"}') == ('{"zone": "UTC"}', [])
    stream = ContentStream()
    assert [stream.feed(p) for p in ("Hi ", "there <to", "ol_c", "all>{", '"name"')] == ["Hi ", "there ", "", "", ""]
    assert stream.feed("x") == "" and stream.in_call
    whole = ContentStream()  # an answer that starts as JSON may be a bare call: held to the end
    assert [whole.feed(p) for p in (" ", '{"name"', ": 1}")] == ["", "", ""] and whole.in_call
    tagged = ContentStream()
    assert [tagged.feed(p) for p in ("[TOOL", "_CALLS]", " [")] == ["", "", ""] and tagged.in_call
    prose = ContentStream()
    assert [prose.feed(p) for p in ("  ", "The", " end")] == ["", "  The", " end"]


def test_bitmask_paths_agree() -> None:
    """The C pass and the tensor ops block the same logits: rows in any order, a vocabulary that
    ends inside a mask word, words of all ones, all zeros and mixed."""
    from lightserve.backend import cpu_kernels
    from lightserve.backend.sampling.grammar import apply_token_bitmask

    gen = torch.Generator().manual_seed(0)
    vocab, words = 1000, 32  # 32 words hold 1024 bits
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), generator=gen, dtype=torch.int32)
    bitmask[0, 3], bitmask[1, 5], bitmask[2, :] = -1, 0, bitmask[2, :] | 0x0F0F0F0F
    logits = torch.randn(5, vocab, generator=gen)
    rows = [4, 0, 2]
    expected = logits.clone()
    for i, row in enumerate(rows):
        allowed = [(int(bitmask[i, t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
        expected[row, torch.tensor(allowed) == 0] = float("-inf")
    for use_c in ([True, False] if cpu_kernels.available() else [False]):
        got = logits.clone()
        apply_token_bitmask(got, rows, bitmask, use_c=use_c)
        assert torch.equal(got, expected), use_c


# ---- constrained decoding in the engine (tiny random model) -----------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_served_model) -> LLM:
    return LLM(str(tiny_served_model), data_type="float32", max_total_token_num=6000, max_req_total_len=1024)


def constrained(kind: str, text: str, temperature: float, seed: int = 0, max_new_tokens: int = 200) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, grammar=Grammar(kind, text))


def test_random_model_answers_validate_greedy_and_sampled(tiny) -> None:
    prompts, params, schemas = [], [], []
    for name, schema in SCHEMAS.items():
        for k, topic in enumerate(TOPICS[:4]):
            prompts.append(json_prompt(name, topic))
            params.append(constrained("json_schema", json.dumps(schema), temperature=0.0 if k < 2 else 1.0, seed=k))
            schemas.append(schema)
    outs = tiny.generate(prompts, params)
    for out, schema in zip(outs, schemas):
        completion = out.outputs[0]
        assert completion.finish_reason == "eos_token", completion  # the grammar ended it, not the length
        jsonschema.validate(json.loads(completion.text), schema)
    assert_kv_whole(tiny.engine)


def test_offline_llm_refuses_a_bad_grammar_before_running(tiny) -> None:
    with pytest.raises(ValueError, match="unclosed group"):
        tiny.generate("x", constrained("regex", "a(b", temperature=0.0))
    assert tiny.engine.num_running == 0


def test_regex_and_choice_answers_match_in_full(tiny) -> None:
    cases = [("regex", REGEXES["date"]), ("regex", REGEXES["email"]), ("choice", json.dumps(CHOICES))]
    prompts = [f"Give a value #{i}." for i in range(4)]
    for kind, text in cases:
        params = [constrained(kind, text, temperature=t, seed=i) for i, t in enumerate((0.0, 1.0, 1.0, 1.5))]
        for out in tiny.generate(prompts, params):
            answer = out.outputs[0].text
            assert (answer in CHOICES) if kind == "choice" else re.fullmatch(text, answer), (kind, answer)


def test_grammar_survives_pause_recompute_chunks_and_cache_hits(tiny_served_model) -> None:
    """A pool too small for every answer (requests are paused and recomputed, their matchers
    rebuilt from the tokens they had), prompts computed in chunks of 16, and every prompt twice (the
    second time from the prefix cache): each answer still validates, and no slot leaks."""
    # Optimistic admission guessing 20-token answers: more requests run than the pool can finish.
    llm = LLM(str(tiny_served_model), data_type="float32", max_total_token_num=700, max_req_total_len=400,
              chunked_prefill_size=16, router_token_ratio=0.9, router_max_new_token_len=20)
    paused: list = []
    requeue = llm.queue.requeue_paused
    llm.queue.requeue_paused = lambda reqs: requeue(paused.extend(reqs) or paused[-len(reqs):])
    # Answers of 120-250 characters (each at most a token per character: they fit in 300 tokens).
    schema = {"type": "object", "properties": {"notes": {"type": "string", "minLength": 120, "maxLength": 250}},
              "required": ["notes"], "additionalProperties": False}
    prompts = [json_prompt("notes", topic) + " " + "More words to make a longer prompt. " * 3 for topic in TOPICS[:8]]
    params = [constrained("json_schema", json.dumps(schema), temperature=1.0, seed=i, max_new_tokens=300)
              for i in range(8)]
    outs = llm.generate(prompts + prompts, params + params)
    assert any(r.output_ids for r in paused), "the pool was meant to pause requests part-way through their answers"
    assert any(o.num_cached_tokens > 0 for o in outs[8:])
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert [o.outputs[0].text for o in outs[:8]] == [o.outputs[0].text for o in outs[8:]]  # seeded: same answers
    assert_kv_whole(llm.engine)


# ---- over HTTP --------------------------------------------------------------------------------------


def test_routes_constrain_and_refuse_bad_grammars(tiny_server) -> None:
    url = tiny_server.url
    r = httpx.post(url + "/generate", json={"inputs": "A date:", "parameters": {
        "max_new_tokens": 30, "grammar": {"type": "regex", "value": REGEXES["date"]}}}, timeout=60)
    assert r.status_code == 200 and re.fullmatch(REGEXES["date"], r.json()["generated_text"]), r.text
    r = httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "Mood:", "max_tokens": 10,
                                                 "guided_choice": CHOICES}, timeout=60)
    assert r.json()["choices"][0]["text"] in CHOICES
    body = {"model": "llama", "messages": [{"role": "user", "content": "Rate it."}], "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMAS["review"]}}}
    answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), SCHEMAS["review"])
    # A bad schema is refused at the door, and the server goes on serving.
    r = httpx.post(url + "/v1/chat/completions", json={**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    r = httpx.post(url + "/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(("}}})
    assert r.status_code == 422 and "parameters.grammar.value" in r.json()["error"]
    jsonschema.validate(json.loads(httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
                                   ["choices"][0]["message"]["content"]), SCHEMAS["review"])


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    # An integer: with a float, greedy SmolLM2 writes "31.2188888..." until max_tokens ends it.
    population_millions: int = pydantic.Field(ge=0, le=40)


@pytest.fixture(scope="module")
def smol_client(smol_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_parse_with_a_pydantic_model(smol_client) -> None:
    completion = smol_client.chat.completions.parse(
        model="SmolLM2-135M-Instruct", response_format=City, temperature=0, max_tokens=80,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}])
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.name


WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(smol_client, tool_choice: Any, stream: bool) -> None:
    kwargs = dict(model="SmolLM2-135M-Instruct", tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=tool_choice,
                  temperature=0, max_tokens=60)
    if stream:
        chunks = list(smol_client.chat.completions.create(messages=WEATHER, stream=True, **kwargs))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert not any(d.content for d in deltas)  # a forced call is not content
        calls = [call for d in deltas for call in (d.tool_calls or [])]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        name, arguments, call_id = calls[0].function.name, calls[0].function.arguments, calls[0].id
    else:
        message = smol_client.chat.completions.create(messages=WEATHER, **kwargs).choices[0]
        assert message.finish_reason == "tool_calls" and message.message.content is None
        call = message.message.tool_calls[0]
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
    if isinstance(tool_choice, dict):
        assert name == "get_weather"
    tool = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])
    # The round trip: the call and its result go back, and the model answers in text.
    follow = smol_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", tools=[WEATHER_TOOL, TIME_TOOL], temperature=0, max_tokens=30,
        messages=WEATHER + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"celsius": 21, "sky": "sunny"})}])
    assert follow.choices[0].message.content


def test_auto_tool_choice_streams_what_it_answers(smol_client) -> None:
    """With `tool_choice: "auto"` the answer is free: streamed or not, the same content and calls."""
    kwargs = dict(model="SmolLM2-135M-Instruct", tools=[WEATHER_TOOL, TIME_TOOL], temperature=0, max_tokens=40,
                  messages=WEATHER)
    plain = smol_client.chat.completions.create(**kwargs).choices[0]
    chunks = list(smol_client.chat.completions.create(stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert content == (plain.message.content or "")
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in plain.message.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason


def test_a_constrained_stream_cut_short_frees_its_kv(tiny_server) -> None:
    url = tiny_server.url
    body = {"inputs": "Notes:", "parameters": {"max_new_tokens": 400, "grammar": {"type": "json", "value": {
        "type": "object", "properties": {"notes": {"type": "string", "minLength": 1000}}, "required": ["notes"]}}}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        for n, line in enumerate(r.iter_lines()):
            if n >= 6:
                break  # the client goes away mid-answer
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _metric(url, "lightserve_kv_slots_used") > 0:
        time.sleep(0.1)
    assert _metric(url, "lightserve_kv_slots_used") == 0
    assert httpx.post(url + "/generate", json=body | {"parameters": body["parameters"] | {"max_new_tokens": 8}},
                      timeout=60).status_code == 200


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return next(s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                for s in f.samples if s.name == name)
