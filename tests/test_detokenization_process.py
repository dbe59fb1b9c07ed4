"""The detokenization process between its real sockets: the test binds the router's and the
httpserver's inboxes and plays the router's sends. A stop string ends the request in the
httpserver's output and is reported straight to the router as an `AbortReq` (nobody else
sees stop strings, and the router must free the request's KV)."""

from __future__ import annotations

import pytest
import transformers
import zmq

from lightserve.detokenization.manager import start_detokenization_process
from lightserve.io_struct import AbortReq, BatchTextOut, BatchTokenOut, FinishReason, GenerateReq, SamplingParams, TokenOut
from lightserve.launcher import ChildGroup
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths

TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture
def detok(smollm2_dir):
    paths = RunPaths.create()
    ctx = zmq.Context()
    router, http = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    router.bind(paths.router_in)
    http.bind(paths.http_in)
    children = ChildGroup()
    children.start([("detokenization", start_detokenization_process,
                     (ServerArgs(log_level="warning"), paths, str(smollm2_dir)))])
    to_detok = ctx.socket(zmq.PUSH)
    to_detok.connect(paths.detok_in)
    try:
        yield to_detok, router, http
    finally:
        children.stop_all()
        ctx.destroy(linger=0)
        paths.remove()


def _texts(http: zmq.Socket, req_ids: set[int]) -> dict[int, list]:
    """TextOuts per request until each of `req_ids` has finished."""
    got: dict[int, list] = {i: [] for i in req_ids}
    while any(not outs or outs[-1].finish_reason is None for outs in got.values()):
        assert http.poll(30_000), f"the httpserver got only {got}"
        batch = serde.HTTP_IN.decode(http.recv())
        assert isinstance(batch, BatchTextOut)
        for out in batch.outs:
            got[out.req_id].append(out)
    return got


def test_a_stop_string_is_reported_to_the_router_by_the_detokenizer(detok, smollm2_dir) -> None:
    to_detok, router, http = detok
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer.encode(TEXT)
    stop = "own f"  # spans the tokens " brown" and " fox"
    to_detok.send(serde.dumps(GenerateReq(1, [], SamplingParams(stop=[stop]))))
    to_detok.send(serde.dumps(GenerateReq(2, [], SamplingParams())))
    for i, token_id in enumerate(ids):
        last = i == len(ids) - 1
        outs = [TokenOut(req_id, token_id, -0.5, FinishReason.LENGTH if last else None) for req_id in (1, 2)]
        to_detok.send(serde.dumps(BatchTokenOut(outs)))

    got = _texts(http, {1, 2})
    assert "".join(o.text for o in got[1]) == TEXT[:TEXT.index(stop)]
    assert got[1][-1].finish_reason is FinishReason.STOP
    assert "".join(o.text for o in got[2]) == TEXT and got[2][-1].finish_reason is FinishReason.LENGTH
    # One abort, for the stopped request only; the one that finished by length the router ends itself.
    assert router.poll(10_000)
    assert serde.ROUTER_IN.decode(router.recv()) == AbortReq(1)
    assert not router.poll(300)
