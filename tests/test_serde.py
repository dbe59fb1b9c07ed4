"""The wire format between processes: msgpack-encoded `io_struct` messages, one typed decoder
per socket. Every kind round-trips through the socket that carries it; anything else on a
socket (another kind, a wrong field, garbage) is refused with an error naming the socket."""

from __future__ import annotations

import logging

import msgspec
import pytest
import zmq

from lightserve.io_struct import (
    AbortReq, BatchTextOut, BatchTokenOut, Chunk, FinishReason, GenerateReq, ImageItem, RouterStats,
    SamplingParams, Shutdown, StepPlan, StepResult, TextOut, TokenOut,
)
from lightserve.utils import serde
from lightserve.utils.inbox import drain

SAMPLING = SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1,
                          presence_penalty=0.5, frequency_penalty=-0.5, seed=2**63 - 1, stop=["END", "★"],
                          stop_token_ids=[2, 3], ignore_eos=True, logprobs=3)
REQ = GenerateReq(req_id=12, prompt_ids=[1, 2, 3], sampling=SAMPLING,
                  images=[ImageItem("d41d8cd98f00b204e9800998ecf8427e", 5, 1, 2)], arrival_time=1.5, output_ids=[9])
TOKEN = TokenOut(12, 42, -0.25, FinishReason.STOP, top_logprobs=[(42, -0.25), (7, -1.5)], prompt_tokens=3, seed=11)
REFUSAL = TokenOut(13, -1, 0.0, FinishReason.ABORT, error="too long")
TEXT = TextOut(12, "Hi ★", 42, -0.25, token_text=" ★", special=False, finish_reason=FinishReason.LENGTH,
               prompt_tokens=3, completion_tokens=4, top_logprobs=[(42, -0.25)], seed=11)

# Each socket and every kind it carries.
CARRIED = [
    (serde.ROUTER_IN, [REQ, AbortReq(12)]),
    (serde.VISUAL_IN, [REQ, AbortReq(12)]),
    (serde.DETOK_IN, [REQ, AbortReq(12), BatchTokenOut([TOKEN, REFUSAL, TokenOut(14, 5, -0.1)])]),
    (serde.HTTP_IN, [BatchTextOut([TEXT, TextOut(13, "", -1, 0.0, error="failed")]),
                     RouterStats(kv_total=100, kv_used=40, running_reqs=2, waiting_reqs=1, queue_times=[0.25])]),
    (serde.RANK_IN, [StepPlan(new_reqs=[REQ], chunks=[Chunk(12, 3)], decode=True, release=[4, 5]), Shutdown()]),
    (serde.RANK_REPLY, [StepResult([TOKEN, REFUSAL], kv_total=100, kv_free=60, kv_cached=30, kv_evictable=20, running_reqs=1)]),
]


@pytest.mark.parametrize("decoder,msgs", CARRIED, ids=[d.socket for d, _ in CARRIED])
def test_every_kind_round_trips_through_its_socket(decoder, msgs) -> None:
    for msg in msgs:
        back = decoder.decode(serde.dumps(msg))
        assert type(back) is type(msg) and back == msg


def test_fields_keep_their_types() -> None:
    back = serde.DETOK_IN.decode(serde.dumps(BatchTokenOut([TOKEN])))
    out = back.outs[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.top_logprobs == [(42, -0.25), (7, -1.5)] and all(type(t) is tuple for t in out.top_logprobs)
    req = serde.ROUTER_IN.decode(serde.dumps(GenerateReq(1, [1], SamplingParams(temperature=1))))
    assert type(req.sampling.temperature) is float  # an int where a float belongs is widened
    assert req.sampling.seed is None and req.images == [] and req.arrival_time > 0


@pytest.mark.parametrize("decoder,msg", [
    (serde.ROUTER_IN, BatchTokenOut([TOKEN])),
    (serde.ROUTER_IN, BatchTextOut([TEXT])),
    (serde.VISUAL_IN, RouterStats(1, 0, 0, 0)),
    (serde.DETOK_IN, BatchTextOut([TEXT])),
    (serde.HTTP_IN, BatchTokenOut([TOKEN])),
    (serde.HTTP_IN, AbortReq(1)),
    (serde.HTTP_IN, StepPlan()),
    (serde.RANK_IN, AbortReq(1)),
    (serde.RANK_REPLY, BatchTokenOut([TOKEN])),
])
def test_a_kind_another_socket_carries_is_refused(decoder, msg) -> None:
    with pytest.raises(serde.MessageError) as exc:
        decoder.decode(serde.dumps(msg))
    text = str(exc.value)
    assert text.startswith(decoder.socket + ": not a ") and type(msg).__name__ in text, text


@pytest.mark.parametrize("payload,why", [
    ({"type": "AbortReq", "req_id": "12"}, "Expected `int`, got `str` - at `$.req_id`"),
    ({"type": "AbortReq"}, "missing required field `req_id`"),
    ({"type": "AbortReq", "req_id": 1, "extra": 2}, "unknown field `extra`"),
    ({"req_id": 1}, "missing required field `type`"),
    ({"type": "Popen", "args": ["sh"]}, "Invalid value 'Popen'"),
    ({"type": "GenerateReq", "req_id": 1, "prompt_ids": [1], "sampling": {"temperature": "hot"}},
     "Expected `float`, got `str` - at `$.sampling.temperature`"),
    (["AbortReq", 1], "Expected `object`, got `array`"),
])
def test_a_malformed_message_is_refused_with_the_reason(payload, why) -> None:
    with pytest.raises(serde.MessageError, match="^router inbox: ") as exc:
        serde.ROUTER_IN.decode(msgspec.msgpack.encode(payload))
    assert why in str(exc.value)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x81\xa4type", b"not msgpack at all", b"\x80" * 3])
def test_garbage_bytes_are_refused(data) -> None:
    with pytest.raises(serde.MessageError, match="^detokenizer inbox: not a GenerateReq"):
        serde.DETOK_IN.decode(data)


def test_drain_drops_a_bad_message_and_delivers_the_rest(caplog) -> None:
    ctx = zmq.Context()
    try:
        inbox, sender = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        inbox.bind("inproc://inbox")
        sender.connect("inproc://inbox")
        for data in (serde.dumps(REQ), b"\xc1", serde.dumps(BatchTextOut([TEXT])), serde.dumps(AbortReq(12))):
            sender.send(data)
        with caplog.at_level(logging.ERROR, logger="lightserve.utils.inbox"):
            got = list(drain(inbox, serde.ROUTER_IN, block=True))
            assert list(drain(inbox, serde.ROUTER_IN, block=False)) == []
    finally:
        ctx.destroy(linger=0)
    assert got == [REQ, AbortReq(12)]
    assert [r.message.split(":")[1].strip() for r in caplog.records] == ["router inbox"] * 2
