"""The request parsing / validation layer of the HTTP front end, as pure functions.

A TGI body goes through `parse_tgi_request` (JSON, types, fields that are not sampling
parameters) and, once the prompt is tokenized, `tgi_sampling_params` (ranges, token budget,
greedy-or-sampling). Valid bodies must give the right `SamplingParams`; bad ones a 422 whose
message names the field.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from lightserve.httpserver.errors import ApiError
from lightserve.httpserver.params import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, read_body
from lightserve.httpserver.tgi_params import parse_tgi_request, samples, tgi_sampling_params, truncate_prompt
from lightserve.io_struct import SamplingParams
from lightserve.server_args import ServerArgs

ARGS = ServerArgs(max_req_total_len=1000, max_new_tokens_default=64)


def sampling_for(body: Any, prompt_len: int = 10, args: ServerArgs = ARGS) -> SamplingParams:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = parse_tgi_request(raw, args)
    return tgi_sampling_params(req.parameters, prompt_len, args)


def params(**kw: Any) -> dict[str, Any]:
    return {"inputs": "Hello", "parameters": kw}


# ---- valid bodies ----------------------------------------------------------------------------


def test_minimal_body_is_greedy_with_default_length() -> None:
    sp = sampling_for({"inputs": "Hello"})
    assert sp.is_greedy
    assert sp.max_new_tokens == ARGS.max_new_tokens_default
    assert (sp.top_p, sp.top_k, sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty) == (1.0, -1, 1.0, 0.0, 0.0)
    assert sp.seed is None and sp.stop == [] and not sp.ignore_eos


def test_all_parameters_are_carried_over() -> None:
    sp = sampling_for(
        params(
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            repetition_penalty=1.2,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            max_new_tokens=12,
            stop=["\n\n", "END"],
            ignore_eos=True,
            seed=1234,
        )
    )
    assert sp == SamplingParams(
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=1234,
        stop=["\n\n", "END"],
        ignore_eos=True,
    )


@pytest.mark.parametrize(
    "given_params, sampled",
    [
        ({}, False),
        ({"do_sample": False}, False),
        ({"do_sample": True}, True),
        ({"temperature": 0.7}, True),  # TGI: a warper away from neutral means sampling
        ({"temperature": 1.0}, False),
        ({"temperature": 0.0, "do_sample": True}, False),  # 0 always means greedy
        ({"top_k": 50}, True),
        ({"top_k": 0}, False),
        ({"top_p": 0.9}, True),
        ({"top_p": 1.0}, False),
        ({"repetition_penalty": 1.3}, False),  # penalties apply to greedy decoding too
    ],
)
def test_greedy_or_sampling_follows_tgi(given_params: dict, sampled: bool) -> None:
    sp = sampling_for(params(**given_params))
    assert sp.is_greedy is (not sampled)
    # A sampled request always has a seed to report; greedy ones get none drawn.
    assert (sp.seed is not None) is sampled


def test_drawn_seeds_are_in_range_and_differ() -> None:
    seeds = {sampling_for(params(do_sample=True)).seed for _ in range(4)}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_given_seed_is_kept() -> None:
    assert sampling_for(params(do_sample=True, seed=7)).seed == 7


@pytest.mark.parametrize(
    "spelling",
    [{"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"]}],
)
def test_stop_aliases(spelling: dict) -> None:
    assert sampling_for(params(**spelling)).stop == ["a", "b"]


def test_single_stop_string_is_a_list_of_one() -> None:
    assert sampling_for(params(stop="###")).stop == ["###"]


@pytest.mark.parametrize("spelling", ["details", "return_details"])
def test_details_aliases(spelling: str) -> None:
    assert parse_tgi_request(json.dumps(params(**{spelling: True})).encode(), ARGS).parameters.details is True


def test_huggingface_hub_body_with_every_field_is_accepted() -> None:
    # What InferenceClient.text_generation sends: every TGI field, unused ones null / neutral.
    body = params(
        adapter_id=None,
        best_of=None,
        decoder_input_details=False,
        details=True,
        do_sample=False,
        frequency_penalty=None,
        grammar=None,
        max_new_tokens=20,
        repetition_penalty=None,
        return_full_text=False,
        seed=None,
        stop=[],
        temperature=None,
        top_k=None,
        top_n_tokens=None,
        top_p=None,
        truncate=None,
        typical_p=None,
        watermark=False,
    )
    body["stream"] = False
    sp = sampling_for(body)
    assert sp.is_greedy and sp.max_new_tokens == 20 and sp.stop == []


def test_unknown_keys_and_null_parameters_are_ignored() -> None:
    assert sampling_for({"inputs": "x", "parameters": None, "options": {"wait": True}}).is_greedy
    assert sampling_for(params(some_future_knob=3)).is_greedy


def test_stream_flag_is_parsed() -> None:
    assert parse_tgi_request(b'{"inputs": "x", "stream": true}', ARGS).stream is True
    assert not parse_tgi_request(b'{"inputs": "x"}', ARGS).stream


def test_integers_are_accepted_for_float_fields() -> None:
    assert sampling_for(params(temperature=2, top_p=1)).temperature == 2.0


def test_default_length_shrinks_to_fit_a_long_prompt() -> None:
    args = ServerArgs(max_req_total_len=100, max_new_tokens_default=64)
    assert sampling_for({"inputs": "x"}, prompt_len=80, args=args).max_new_tokens == 20
    assert sampling_for({"inputs": "x"}, prompt_len=10, args=args).max_new_tokens == 64
    # An explicit request that exactly fills the budget is fine.
    assert sampling_for(params(max_new_tokens=90), prompt_len=10, args=args).max_new_tokens == 90


@pytest.mark.parametrize(
    "ids, truncate, expected",
    [([1, 2, 3, 4], None, [1, 2, 3, 4]), ([1, 2, 3, 4], 2, [3, 4]), ([1, 2], 5, [1, 2])],
)
def test_truncate_keeps_the_last_tokens(ids: list[int], truncate: Optional[int], expected: list[int]) -> None:
    assert truncate_prompt(ids, truncate) == expected


# ---- bad bodies ------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, Any, int, str]] = [
    # (case, body, prompt_len, text the message must contain)
    ("not json", b"{not json", 10, "Invalid JSON"),
    ("truncated json", b'{"inputs": "x"', 10, "Invalid JSON"),
    ("array body", b"[1, 2]", 10, "object"),
    ("missing inputs", {"parameters": {}}, 10, "`inputs`"),
    ("inputs not a string", {"inputs": 5}, 10, "`inputs`"),
    ("empty inputs", {"inputs": ""}, 10, "`inputs` must not be empty"),
    ("no prompt tokens", {"inputs": "x"}, 0, "`inputs`"),
    ("parameters not an object", {"inputs": "x", "parameters": [1]}, 10, "`parameters`"),
    ("temperature as string", params(temperature="0.5"), 10, "`parameters.temperature`"),
    ("temperature NaN", b'{"inputs": "x", "parameters": {"temperature": NaN}}', 10, "`parameters.temperature`"),
    ("temperature negative", params(temperature=-0.5), 10, "`temperature`"),
    ("temperature too high", params(temperature=101), 10, "`temperature`"),
    ("do_sample not bool", params(do_sample="yes"), 10, "`parameters.do_sample`"),
    ("do_sample as int", params(do_sample=1), 10, "`parameters.do_sample`"),
    ("ignore_eos as string", params(ignore_eos="true"), 10, "`parameters.ignore_eos`"),
    ("max_new_tokens fractional", params(max_new_tokens=1.5), 10, "`parameters.max_new_tokens`"),
    ("max_new_tokens bool", params(max_new_tokens=True), 10, "`parameters.max_new_tokens`"),
    ("max_new_tokens string", params(max_new_tokens="10"), 10, "`parameters.max_new_tokens`"),
    ("max_new_tokens zero", params(max_new_tokens=0), 10, "`parameters.max_new_tokens`"),
    ("max_new_tokens negative", params(max_new_tokens=-3), 10, "`parameters.max_new_tokens`"),
    ("over token budget", params(max_new_tokens=991), 10, "`parameters.max_new_tokens`"),
    ("prompt fills budget", {"inputs": "x"}, 1000, "max_req_total_len"),
    ("top_p zero", params(top_p=0.0), 10, "`top_p`"),
    ("top_p above one", params(top_p=1.5), 10, "`top_p`"),
    ("top_k negative", params(top_k=-2), 10, "`top_k`"),
    ("top_k fractional", params(top_k=2.5), 10, "`parameters.top_k`"),
    ("repetition_penalty zero", params(repetition_penalty=0), 10, "`repetition_penalty`"),
    ("presence_penalty high", params(presence_penalty=3), 10, "`presence_penalty`"),
    ("frequency_penalty low", params(frequency_penalty=-2.5), 10, "`frequency_penalty`"),
    ("seed negative", params(do_sample=True, seed=-1), 10, "`seed`"),
    ("seed too large", params(do_sample=True, seed=2**63), 10, "`seed`"),
    ("seed negative, greedy", params(seed=-1), 10, "`seed`"),
    ("too many stops", params(stop=[f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]), 10, "`parameters.stop`"),
    ("stop too long", params(stop=["x" * (MAX_STOP_LENGTH + 1)]), 10, "`parameters.stop`"),
    ("empty stop", params(stop=[""]), 10, "`parameters.stop`"),
    ("stop not strings", params(stop=[1]), 10, "`parameters.stop.0`"),
    ("both stop spellings", params(stop=["a"], stop_sequences=["b"]), 10, "`stop_sequences`"),
    ("both details spellings", params(details=True, return_details=True), 10, "`return_details`"),
    ("best_of", params(best_of=2), 10, "`parameters.best_of`"),
    ("typical_p", params(typical_p=0.5), 10, "`parameters.typical_p`"),
    ("watermark", params(watermark=True), 10, "`parameters.watermark`"),
    ("grammar schema invalid", params(grammar={"type": "json", "value": {"type": "objekt"}}), 10, "`parameters.grammar.value`"),
    ("grammar regex invalid", params(grammar={"type": "regex", "value": "a(b"}), 10, "unclosed group"),
    ("grammar type", params(grammar={"type": "ebnf", "value": "x"}), 10, "`parameters.grammar.type`"),
    ("top_n_tokens", params(top_n_tokens=5), 10, "`parameters.top_n_tokens`"),
    ("adapter_id", params(adapter_id="lora"), 10, "`parameters.adapter_id`"),
    ("truncate zero", params(truncate=0), 10, "`parameters.truncate`"),
    ("images without multimodal", {"inputs": "x", "multimodal_params": {"images": [{"type": "base64", "data": "AA=="}]}}, 10, "--enable_multimodal"),
    ("image not an object", {"inputs": "x", "multimodal_params": {"images": ["AA=="]}}, 10, "`multimodal_params.images.0`"),
]


@pytest.mark.parametrize("case, body, prompt_len, needle", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_422_naming_the_field(case: str, body: Any, prompt_len: int, needle: str) -> None:
    with pytest.raises(ApiError) as info:
        sampling_for(body, prompt_len=prompt_len)
    err = info.value
    assert err.status_code == 422
    assert err.tgi_body() == {"error": err.message, "error_type": "validation"}
    assert needle in err.message, err.message
    assert "Traceback" not in err.message


def test_many_type_errors_are_reported_together_but_bounded() -> None:
    with pytest.raises(ApiError) as info:
        sampling_for(params(temperature="a", top_p="b", top_k="c", seed="d", max_new_tokens="e"))
    assert info.value.message.count("`parameters.") == 3


# ---- property: any in-range parameters map faithfully ----------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    do_sample=st.one_of(st.none(), st.booleans()),
    temperature=st.one_of(st.none(), st.floats(0.0, 100.0, **finite)),
    top_p=st.one_of(st.none(), st.floats(0.01, 1.0, **finite)),
    top_k=st.one_of(st.none(), st.integers(0, 1000)),
    repetition_penalty=st.one_of(st.none(), st.floats(0.01, 10.0, **finite)),
    presence_penalty=st.one_of(st.none(), st.floats(-2.0, 2.0, **finite)),
    max_new_tokens=st.one_of(st.none(), st.integers(1, 990)),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
)
def test_in_range_parameters_map_faithfully(**given_params: Any) -> None:
    body = params(**{k: v for k, v in given_params.items() if v is not None})
    sp = sampling_for(body, prompt_len=10)
    sp.validate()
    p = given_params
    sampled = p["temperature"] != 0.0 and bool(
        p["do_sample"]
        or (p["temperature"] is not None and p["temperature"] != 1.0)
        or (p["top_k"] or 0) > 0
        or (p["top_p"] is not None and p["top_p"] < 1.0)
    )
    assert sp.is_greedy is (not sampled)
    if sampled:
        assert sp.temperature == (1.0 if p["temperature"] is None else p["temperature"])
        assert sp.seed is not None and (p["seed"] is None or sp.seed == p["seed"])
    assert sp.max_new_tokens == (ARGS.max_new_tokens_default if p["max_new_tokens"] is None else p["max_new_tokens"])
    assert sp.top_k == (p["top_k"] or -1)
    assert sp.repetition_penalty == (1.0 if p["repetition_penalty"] is None else p["repetition_penalty"])
    parsed = parse_tgi_request(json.dumps(body).encode(), ARGS).parameters
    assert samples(parsed) is sampled


# ---- body size limit -------------------------------------------------------------------------


def _request(chunks: list[bytes], content_length: Optional[int]) -> Request:
    """A starlette Request fed by an ASGI receive channel delivering `chunks`."""
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return messages.pop(0)

    return Request({"type": "http", "method": "POST", "path": "/generate", "headers": headers}, receive)


@pytest.mark.parametrize(
    "chunks, content_length",
    [
        ([b"x" * 100], 100),  # declared and sent: refused before reading
        ([b"x" * 40] * 3, None),  # chunked: refused while reading
        ([b"x" * 40] * 3, 80),  # a lying Content-Length does not help
    ],
)
def test_body_over_limit_is_413(chunks: list[bytes], content_length: Optional[int]) -> None:
    with pytest.raises(ApiError) as info:
        asyncio.run(read_body(_request(chunks, content_length), limit=99))
    assert info.value.status_code == 413 and "99 bytes" in info.value.message


def test_body_at_limit_is_read_whole() -> None:
    assert asyncio.run(read_body(_request([b"ab" * 20, b"c" * 59], None), limit=99)) == b"ab" * 20 + b"c" * 59
