"""Malformed and hostile requests against the real server, the in-flight bound, and the security
defaults (loopback bind, private run directory, rpyc services that expose only their methods).

One server for the module, started with small limits so each one is reachable from a test:
6 generations in flight (4 running + 2 waiting), 64 KiB bodies, 4096 tokens per request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import msgspec
import psutil
import pytest
import rpyc
from rpyc.utils.server import ThreadedServer

from lightserve.backend.engine import ModelEngine
from lightserve.backend.worker import ModelWorkerService, RankRunner
from lightserve.utils import serde
from lightserve.utils.rpc import RPYC_CONFIG
from lightserve.cache_manager.manager import start_cache_manager_process
from lightserve.cache_manager.protocol import CacheStats, GetStats
from lightserve.httpserver.admission import Admission, InFlightLimit
from lightserve.httpserver.errors import ApiError
from lightserve.io_struct import StepPlan
from lightserve.launcher import ChildGroup
from lightserve.server_args import ServerArgs
from lightserve.utils.run_paths import RunPaths
from tests.server_harness import ServerProcess
from tests.test_server_e2e import metrics, wait_pool_free

BODY_LIMIT = 64 * 1024
RUNNING, WAITING = 4, 2
FLAGS = ("--data_type", "float32", "--max_total_token_num", "30000", "--max_req_total_len", "4096",
         "--running_max_req_size", str(RUNNING), "--max_waiting_reqs", str(WAITING),
         "--max_body_bytes", str(BODY_LIMIT), "--max_new_tokens_default", "8", "--log_level", "warning")
MODEL = "@MODEL@"  # replaced by the served model's name when a body is sent
JSON = {"content-type": "application/json"}
NORMAL = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 12, "ignore_eos": True, "details": True}}


@pytest.fixture(scope="module")
def server(tiny_served_model):
    with ServerProcess(tiny_served_model, *FLAGS) as s:
        yield s


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def baseline(server) -> dict:
    """The answer to a normal greedy request before any hostile one was sent."""
    r = httpx.post(server.url + "/generate", json=NORMAL, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ---- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: Optional[bytes]
    status: int
    headers: tuple[tuple[str, str], ...] = tuple(JSON.items())
    method: str = "POST"


def j(obj: object) -> bytes:
    return json.dumps(obj).encode()


def tgi(**parameters: object) -> bytes:
    return j({"inputs": "Hello", "parameters": {"max_new_tokens": 4, **parameters}})


def tgi_raw(parameters: bytes) -> bytes:
    """A TGI body whose `parameters` are given as raw JSON text (for literals json.dumps refuses)."""
    return b'{"inputs": "Hello", "parameters": ' + parameters + b"}"


def chat(**fields: object) -> bytes:
    return j({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields})


def with_raw(body: bytes, member: bytes) -> bytes:
    """`body` (a JSON object) with one more member given as raw JSON text."""
    return body[:-1] + b", " + member + b"}"


def completion(**fields: object) -> bytes:
    return j({"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields})


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def image_part(url: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def tgi_case(id: str, body: bytes, status: int = 422, path: str = "/generate", **kw) -> Case:
    return Case(id, path, body, status, **kw)


def chat_case(id: str, body: bytes, status: int = 400, **kw) -> Case:
    return Case(id, "/v1/chat/completions", body, status, **kw)


def completion_case(id: str, body: bytes, status: int = 400, **kw) -> Case:
    return Case(id, "/v1/completions", body, status, **kw)


CASES = [
    # -- TGI: JSON syntax and shape
    tgi_case("malformed-json", b"{not json"),
    tgi_case("empty-body", b""),
    tgi_case("json-array", b"[1, 2]"),
    tgi_case("json-null", b"null"),
    tgi_case("json-string", b'"Hello"'),
    tgi_case("trailing-garbage", b'{"inputs": "Hello"} {"inputs": "again"}'),
    tgi_case("inputs-int", j({"inputs": 5})),
    tgi_case("inputs-null", j({"inputs": None})),
    tgi_case("inputs-missing", j({"parameters": {}})),
    tgi_case("inputs-empty", j({"inputs": ""})),
    tgi_case("parameters-list", j({"inputs": "Hello", "parameters": [1]})),
    tgi_case("deep-nesting", tgi_raw(b'{"grammar": ' + deep(5_000) + b"}")),
    # -- TGI: types and ranges
    tgi_case("max-new-string", tgi(max_new_tokens="10")),
    tgi_case("max-new-float", tgi(max_new_tokens=10.5)),
    tgi_case("max-new-bool", tgi(max_new_tokens=True)),
    tgi_case("max-new-negative", tgi(max_new_tokens=-3)),
    tgi_case("max-new-zero", tgi(max_new_tokens=0)),
    tgi_case("max-new-10^30", tgi(max_new_tokens=10**30)),
    tgi_case("max-new-over-budget", tgi(max_new_tokens=4096)),
    tgi_case("temperature-NaN", tgi_raw(b'{"temperature": NaN}')),
    tgi_case("temperature-Infinity", tgi_raw(b'{"temperature": Infinity}')),
    tgi_case("temperature--Infinity", tgi_raw(b'{"temperature": -Infinity}')),
    tgi_case("temperature-1e400", tgi_raw(b'{"temperature": 1e400}')),
    tgi_case("temperature-negative", tgi(temperature=-0.5)),
    tgi_case("top-p-zero", tgi(top_p=0)),
    tgi_case("top-p-7", tgi(top_p=7)),
    tgi_case("top-k-negative", tgi(top_k=-5)),
    tgi_case("repetition-penalty-zero", tgi(repetition_penalty=0)),
    # Positive, but float32 rounds it to 0 or the sampler's division overflows: found by fuzzing,
    # these took the whole server down.
    tgi_case("repetition-penalty-5e-324", tgi(repetition_penalty=5e-324)),
    tgi_case("repetition-penalty-1e-40", tgi(repetition_penalty=1e-40)),
    tgi_case("repetition-penalty-below-0.01", tgi(repetition_penalty=0.009)),
    tgi_case("repetition-penalty-above-10", tgi(repetition_penalty=10.5)),
    tgi_case("temperature-above-100", tgi(temperature=100.5)),
    tgi_case("top-p-NaN", tgi_raw(b'{"top_p": NaN}')),
    tgi_case("presence-penalty-2.5", tgi(presence_penalty=2.5)),
    tgi_case("presence-penalty-NaN", tgi_raw(b'{"presence_penalty": NaN}')),
    tgi_case("frequency-penalty--3", tgi(frequency_penalty=-3)),
    tgi_case("frequency-penalty-1e400", tgi_raw(b'{"frequency_penalty": 1e400}')),
    # Extreme but valid: float32 rounds the temperature to 0 (greedy); a top-k wider than the
    # vocabulary cuts nothing; the bounds themselves sample normally.
    tgi_case("temperature-5e-324", tgi(temperature=5e-324), 200),
    tgi_case("top-k-10^30", tgi(top_k=10**30), 200),
    tgi_case("sampling-at-the-bounds", tgi(temperature=100, top_p=1e-30, repetition_penalty=0.01,
                                           presence_penalty=-2, frequency_penalty=2, seed=2**63 - 1), 200),
    tgi_case("seed-negative", tgi(seed=-1, do_sample=True)),
    tgi_case("seed-2^64", tgi(seed=2**64, do_sample=True)),
    tgi_case("truncate-zero", tgi(truncate=0)),
    tgi_case("best-of-unsupported", tgi(best_of=2)),
    # -- TGI: stop strings
    tgi_case("stop-1000-strings", tgi(stop=["a"] * 1000)),
    tgi_case("stop-10000-chars", tgi(stop=["a" * 10_000])),
    tgi_case("stop-empty-string", tgi(stop=[""])),
    tgi_case("stop-int", tgi(stop=[5])),
    tgi_case("stop-and-stop-sequences", tgi(stop=["a"], stop_sequences=["b"])),
    # -- TGI: sizes, encodings, media types, methods
    tgi_case("prompt-over-token-budget", j({"inputs": "word " * 5000})),
    tgi_case("body-over-limit", j({"inputs": "a" * (BODY_LIMIT + 1)}), 413),
    tgi_case("content-type-text-plain", j(NORMAL), 415, headers=(("content-type", "text/plain"),)),
    tgi_case("content-type-form", b"inputs=Hello", 415, headers=(("content-type", "application/x-www-form-urlencoded"),)),
    tgi_case("content-type-multipart", j(NORMAL), 415, headers=(("content-type", "multipart/form-data; boundary=x"),)),
    tgi_case("lone-surrogate", b'{"inputs": "ab\\ud800cd"}'),
    tgi_case("lone-low-surrogate", b'{"inputs": "\\udc00"}'),
    tgi_case("invalid-utf8", b'{"inputs": "ab\xff\xfe"}'),
    tgi_case("bad-base64-image", j({"inputs": "Hello", "multimodal_params": {"images": [{"type": "base64", "data": "!!!"}]}})),
    tgi_case("stream-bad-parameters", tgi(top_p=7), path="/generate_stream"),
    tgi_case("compat-stream-not-bool", j({"inputs": "Hello", "stream": "yes"}), path="/"),
    Case("get-on-post-route", "/generate", None, 405, method="GET"),
    # -- TGI: odd but valid text is served
    tgi_case("nul-rtl-emoji-combining", j({"inputs": "a\u0000b \u202eRTL\u202c \u05e9\u05dc\u05d5\u05dd \U0001F600 e\u0301",
                                           "parameters": {"max_new_tokens": 4}}), 200),
    tgi_case("emoji-stop-string", tgi(stop=["\U0001F600", "\u202e"]), 200),
    tgi_case("surrogate-pair-escape", b'{"inputs": "smile \\ud83d\\ude00", "parameters": {"max_new_tokens": 4}}', 200),
    tgi_case("json-with-charset", tgi(), 200, headers=(("content-type", "application/json; charset=utf-8"),)),
    tgi_case("no-content-type", tgi(), 200, headers=()),
    tgi_case("unknown-parameter-ignored", tgi(frobnicate=True), 200),
    # -- OpenAI chat
    chat_case("chat-missing-model", j({"messages": [{"role": "user", "content": "Hello"}]})),
    chat_case("chat-unknown-model", chat(model="gpt-4o"), 404),
    chat_case("chat-messages-empty", chat(messages=[])),
    chat_case("chat-messages-not-list", chat(messages="Hello")),
    chat_case("chat-role-function", chat(messages=[{"role": "function", "content": "x"}])),
    chat_case("chat-part-type-audio", chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])),
    chat_case("chat-n-zero", chat(n=0)),
    chat_case("chat-n-1000", chat(n=1000)),
    chat_case("chat-n-10^30", chat(n=10**30)),
    chat_case("chat-n-over-capacity", chat(n=RUNNING + WAITING + 1)),
    chat_case("chat-max-tokens-negative", chat(max_tokens=-1)),
    chat_case("chat-top-logprobs-50", chat(logprobs=True, top_logprobs=50)),
    chat_case("chat-tool-name-with-spaces", chat(tools=[{"type": "function", "function": {"name": "rm -rf /"}}])),
    chat_case("chat-tool-choice-unknown", chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                               tool_choice={"type": "function", "function": {"name": "g"}})),
    chat_case("chat-regex-unbalanced", chat(guided_regex="((a")),
    chat_case("chat-schema-not-a-schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}})),
    chat_case("chat-two-constraints", chat(guided_regex="a", guided_choice=["a"])),
    chat_case("chat-huge-regex-repeat", chat(guided_regex="a{100000}", max_tokens=4), 200),
    chat_case("chat-unknown-field", chat(max_token=5)),
    chat_case("chat-stream-options-without-stream", chat(stream_options={"include_usage": True})),
    chat_case("chat-image-bad-base64", chat(messages=[image_part("data:image/png;base64,!!!notbase64")])),
    chat_case("chat-temperature-NaN", with_raw(chat(), b'"temperature": NaN')),
    chat_case("chat-presence-penalty-3", chat(presence_penalty=3)),
    chat_case("chat-frequency-penalty-1e400", with_raw(chat(), b'"frequency_penalty": 1e400')),
    chat_case("chat-top-p-zero", chat(top_p=0)),
    chat_case("chat-repetition-penalty-1e-30", chat(repetition_penalty=1e-30)),
    chat_case("chat-sampling-at-the-bounds", chat(temperature=100, top_k=10**30, repetition_penalty=10,
                                                  presence_penalty=2, frequency_penalty=-2), 200),
    chat_case("chat-deep-user-field", with_raw(chat(), b'"user": ' + deep(5_000))),
    chat_case("chat-lone-surrogate", with_raw(chat(), b'"user": "\\ud800"')),
    chat_case("chat-emoji-rtl", chat(messages=[{"role": "user", "content": "\u202e\U0001F600\u0000"}]), 200),
    # -- OpenAI completions
    completion_case("completion-repetition-penalty-5e-324", completion(repetition_penalty=5e-324)),
    completion_case("completion-temperature-101", completion(temperature=101)),
    completion_case("completion-top-k-negative", completion(top_k=-5)),
    completion_case("completion-token-id-over-vocab", completion(prompt=[10**9])),
    completion_case("completion-token-id-negative", completion(prompt=[-1])),
    completion_case("completion-prompt-empty-list", completion(prompt=[])),
    completion_case("completion-65-prompts", completion(prompt=["a"] * 65)),
    completion_case("completion-17-stop-strings", completion(stop=[str(i) for i in range(17)])),
    completion_case("completion-echo-with-logprobs-21", completion(echo=True, logprobs=21)),
    completion_case("completion-max-tokens-0-without-echo", completion(max_tokens=0)),
    completion_case("completion-body-over-limit", completion(prompt="a" * (BODY_LIMIT + 1)), 413),
    completion_case("completion-text-plain", completion(), 415, headers=(("content-type", "text/plain"),)),
    completion_case("completion-nul-prompt", completion(prompt="\u0000\u0000"), 200),
    Case("unknown-model-card", "/v1/models/unknown", None, 404, method="GET"),
    Case("put-on-completions", "/v1/completions", completion(), 405, method="PUT"),
    Case("unknown-route", "/nowhere", None, 404, method="GET"),
    Case("path-traversal", "/v1/models/..%2f..%2fetc%2fpasswd", None, 404, method="GET"),
]


def leaks(text: str, secrets: list[str]) -> list[str]:
    """Signs of internals in an error answer: tracebacks, source files, the server's own paths."""
    found = [s for s in secrets if s and s in text]
    found += re.findall(r"Traceback|File \"|\.py\b|site-packages", text)
    return found


def check_shape(case: Case, r: httpx.Response) -> None:
    body = r.json()
    if r.status_code == 200:
        assert isinstance(body, dict) and ("generated_text" in body or "choices" in body), body
    elif case.path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    else:
        assert set(body) == {"error", "error_type"} and body["error"], body


def test_the_cases_cover_at_least_40_hostile_requests() -> None:
    assert len([c for c in CASES if c.status != 200]) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_hostile_requests_get_their_status_then_the_server_serves_normally(server, model_name, baseline,
                                                                           tiny_served_model) -> None:
    secrets = [str(tiny_served_model), server.run_dir(), str(Path.home())]
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for case in CASES:
            body = None if case.body is None else case.body.replace(MODEL.encode(), model_name.encode())
            r = client.request(case.method, case.path, content=body, headers=dict(case.headers))
            if r.status_code != case.status:
                failures.append(f"{case.id}: {r.status_code} (expected {case.status}) {r.text[:200]}")
                continue
            check_shape(case, r)
            if r.status_code >= 400 and (leaked := leaks(r.text, secrets)):
                failures.append(f"{case.id}: answer reveals {leaked}: {r.text[:200]}")
    assert not failures, "\n".join(failures)
    # The same request answers the same after all of that, and nothing is left holding KV.
    after = httpx.post(server.url + "/generate", json=NORMAL, timeout=60)
    assert after.status_code == 200 and after.json() == baseline
    wait_pool_free(server.url)
    assert "Traceback" not in server.read_log()


# ---- below HTTP: what the ASGI server refuses itself -----------------------------------------


def raw_exchange(port: int, data: bytes, leave_after_s: Optional[float] = None) -> bytes:
    """Send bytes on a fresh connection; read the answer until the server closes it (or leave)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        if leave_after_s is not None:
            time.sleep(leave_after_s)
            return b""
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


BODY = b'{"inputs": "Hello", "parameters": {"max_new_tokens": 2}}'
HEAD = b"POST /generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("request_bytes,status", [
    (HEAD + b"Content-Length: abc\r\n\r\n" + BODY, 400),
    (HEAD + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n" + BODY, 400),
    (HEAD + b"Content-Length: 99999999999999999999999\r\n\r\n" + BODY, 400),
    (b"GARBAGE\r\n\r\n", 400),
    (HEAD + b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT + 10) + b" " * (BODY_LIMIT + 10), 413),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n", 200),
], ids=["content-length-not-a-number", "two-content-lengths", "content-length-10^23",
        "garbage-request-line", "declared-body-over-limit", "chunked-body"])
def test_malformed_http(server, request_bytes: bytes, status: int) -> None:
    answer = raw_exchange(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]


def test_an_oversized_header_never_reaches_the_app(server) -> None:
    request_bytes = HEAD + b"X-Big: " + b"a" * 1_000_000 + b"\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
    try:
        answer = raw_exchange(server.port, request_bytes)
    except ConnectionResetError:  # refused while the rest of the request was still unread
        answer = b"HTTP/1.1 400 "
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert httpx.post(server.url + "/generate", content=BODY, headers=JSON).status_code == 200


def test_a_client_leaving_mid_body_is_not_an_error(server) -> None:
    raw_exchange(server.port, HEAD + b"Content-Length: 1000\r\n\r\n" + BODY, leave_after_s=0.3)
    assert httpx.post(server.url + "/generate", content=BODY, headers=JSON).status_code == 200
    assert "Traceback" not in server.read_log()


# ---- overload --------------------------------------------------------------------------------


def test_admission_holds_room_until_released() -> None:
    limit = InFlightLimit(3)
    first, second = Admission(limit), Admission(limit)
    first.grow_to(2)
    with pytest.raises(ApiError) as full:
        second.grow_to(2)
    assert full.value.status_code == 429 and full.value.headers == {"retry-after": "1"}
    second.grow_to(1)
    first.grow_to(1)  # never shrinks: room already held stays held
    assert limit.in_flight == 3
    with pytest.raises(ApiError) as never:
        Admission(limit).grow_to(4)  # could not fit even on an idle server: invalid, not overloaded
    assert never.value.status_code == 422 and never.value.param == "n"
    first.release()
    first.release()
    assert limit.in_flight == 1


async def _hold_streams(url: str, count: int, admitted: asyncio.Event) -> None:
    """Open `count` long streams and keep reading them until cancelled.

    A stream's headers come once the server has admitted it (running or waiting).
    """
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4000, "ignore_eos": True}}
    opened = 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal opened
        async with client.stream("POST", url + "/generate_stream", json=body) as r:
            assert r.status_code == 200
            opened += 1
            if opened == count:
                admitted.set()
            async for _ in r.aiter_lines():
                pass

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(one(client) for _ in range(count)))


def test_beyond_running_plus_waiting_is_429_in_each_shape_and_nothing_queues(server, model_name) -> None:
    async def scenario() -> list[httpx.Response]:
        admitted = asyncio.Event()
        holder = asyncio.create_task(_hold_streams(server.url, RUNNING + WAITING, admitted))
        await asyncio.wait_for(admitted.wait(), 60)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            answers = [
                await client.post("/generate", json={"inputs": "Hello"}),
                await client.post("/generate_stream", json={"inputs": "Hello"}),
                await client.post("/", json={"inputs": "Hello", "stream": True}),
                await client.post("/v1/completions", json={"model": model_name, "prompt": "Hello"}),
                await client.post("/v1/chat/completions",
                                  json={"model": model_name, "messages": [{"role": "user", "content": "Hello"}]}),
            ]
            # The refused requests were not queued: what the router holds is the held streams.
            # (Between admissions, which come every few decode steps, held streams may still be
            # waiting rather than running, so only the sum is bounded.)
            in_router = sum(metrics(server.url, "lightserve_waiting_requests", "lightserve_running_requests"))
            # A malformed body is still told what is wrong with it.
            answers.append(await client.post("/generate", content=b"{oops", headers=JSON))
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        assert in_router <= RUNNING + WAITING
        return answers

    tgi_gen, tgi_stream, compat, completions, chat, malformed = asyncio.run(scenario())
    for r in (tgi_gen, tgi_stream, compat):
        assert r.status_code == 429 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error_type"] == "overloaded" and r.headers["retry-after"] == "1"
    for r in (completions, chat):
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "server_error" and "overloaded" in r.json()["error"]["message"]
    assert malformed.status_code == 422
    wait_pool_free(server.url)
    assert httpx.post(server.url + "/generate", json={"inputs": "Hello"}, timeout=60).status_code == 200


# ---- security defaults -----------------------------------------------------------------------


def test_only_the_http_port_listens_and_only_on_loopback(server) -> None:
    listening = []
    for proc in [psutil.Process(server.proc.pid), *server.children]:
        listening += [c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", server.port)]


def test_run_directory_is_private_and_a_worker_socket_serves_no_second_client(server) -> None:
    run_dir = server.run_dir()
    assert os.stat(run_dir).st_mode & 0o777 == 0o700
    # The rank serves the router's connection only: a second client gets nothing at all.
    conn = rpyc.utils.factory.unix_connect(os.path.join(run_dir, "worker0.rpyc"),
                                           config={**RPYC_CONFIG, "sync_request_timeout": 1})
    try:
        with pytest.raises(rpyc.AsyncResultTimeout):
            conn.root.call(serde.dumps(StepPlan()))
    finally:
        conn.close()
    assert httpx.post(server.url + "/generate", json={"inputs": "Hello"}, timeout=60).status_code == 200


def test_worker_service_exposes_only_its_method(tmp_path, tiny_served_model) -> None:
    args = ServerArgs(device="cpu", data_type="float32", max_total_token_num=64, max_req_total_len=32)
    service = ModelWorkerService(RankRunner(ModelEngine(args, str(tiny_served_model))))
    path = str(tmp_path / "worker.rpyc")
    server = ThreadedServer(service, socket_path=path, protocol_config=RPYC_CONFIG, auto_register=False)
    threading.Thread(target=server.start, daemon=True).start()
    conn = _connect_when_listening(path)
    try:
        result = serde.RANK_REPLY.decode(conn.root.call(serde.dumps(StepPlan())))
        assert result.kv_total == 64  # the one exposed method works
        for reach in (lambda: conn.root.runner, lambda: conn.root.runner.engine, lambda: conn.root._conn,
                      lambda: conn.root.exposed_call.__globals__, lambda: conn.root.call.__func__,
                      lambda: conn.root.getmodule("os"), lambda: conn.root.eval("1 + 1"),
                      lambda: conn.root.__dict__):
            with pytest.raises(AttributeError):
                reach()
        # Only the declared messages decode: an unknown tag, a wrong shape or garbage is refused
        # (rpyc re-raises the rank's msgspec error under the same name).
        for payload, why in ((msgspec.msgpack.encode({"type": "__init__"}), "Invalid value '__init__'"),
                             (msgspec.msgpack.encode({"type": "StepPlan", "decode": "yes"}), "Expected `bool`"),
                             (b"\xc1garbage", "malformed")):
            with pytest.raises(Exception, match=why) as raised:
                conn.root.call(payload)
            assert type(raised.value).__name__ == "lightserve.utils.serde.MessageError"
    finally:
        conn.close()
        server.close()


def _connect_when_listening(path: str, timeout_s: float = 10.0) -> rpyc.Connection:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return rpyc.utils.factory.unix_connect(path, config=RPYC_CONFIG)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_cache_manager_service_exposes_only_its_methods(tmp_path) -> None:
    """The cache manager's rpyc socket, reached as any local client of the run directory could:
    its methods answer, and nothing behind them (the cache, its records, modules, the
    connection, classic-mode helpers) is reachable."""
    paths = RunPaths(str(tmp_path))
    children = ChildGroup()
    children.start([("cache_manager", start_cache_manager_process, (ServerArgs(log_level="warning"), paths))])
    conn = _connect_when_listening(paths.cache_socket)
    try:
        stats = serde.SocketDecoder("reply", CacheStats).decode(conn.root.call(serde.dumps(GetStats())))
        assert stats.records == 0  # the exposed method works
        for reach in (lambda: conn.root.cache, lambda: conn.root.cache.records, lambda: conn.root._conn,
                      lambda: conn.root.exposed_call.__globals__, lambda: conn.root.call.__func__,
                      lambda: conn.root.call.__self__, lambda: conn.root.stats, lambda: conn.root.getmodule("os"),
                      lambda: conn.root.eval("1 + 1"), lambda: conn.root.execute("import os"),
                      lambda: conn.root.__dict__):
            with pytest.raises(AttributeError):
                reach()
        # rpyc's classic (SlaveService) helpers are not there either.
        with pytest.raises(AttributeError):
            conn.modules.os
        with pytest.raises(AttributeError):
            conn.builtins.open
    finally:
        conn.close()
        children.stop_all()
