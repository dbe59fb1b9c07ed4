"""The real multi-process server over HTTP: answers, concurrency, stop strings, aborts, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lightserve import LLM, SamplingParams
from lightserve.cache_manager import shm
from tests.server_harness import TINY_SERVER_FLAGS, ServerProcess

@pytest.fixture(scope="module")
def tiny_llm(tiny_served_model):
    return LLM(str(tiny_served_model), data_type="float32", device="cpu", max_total_token_num=6000,
               max_req_total_len=1024)


def metrics(url: str, *names: str) -> list[float]:
    """The named samples from one scrape of /metrics (so they describe the same moment)."""
    values = {sample.name: sample.value for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
              for sample in family.samples}
    return [values[name] for name in names]


def metric(url: str, name: str) -> float:
    return metrics(url, name)[0]


def wait_pool_free(url: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric(url, "lightserve_kv_slots_used") == 0 and metric(url, "lightserve_running_requests") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"KV pool not free after {timeout_s} s: {metric(url, 'lightserve_kv_slots_used')} used")


def generate(url: str, inputs: str, **parameters) -> dict:
    r = httpx.post(url + "/generate", json={"inputs": inputs, "parameters": parameters}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url: str, inputs: str, **parameters) -> list[dict]:
    events = []
    with httpx.stream("POST", url + "/generate_stream", json={"inputs": inputs, "parameters": parameters}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def test_smollm2_server_matches_offline_llm(smollm2_dir, smol_server):
    question = "What is the capital of France?"
    llm = LLM(str(smollm2_dir), data_type="float32", device="cpu", max_total_token_num=2048, max_req_total_len=512)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
    expected = llm.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0.0))[0].outputs[0]
    del llm
    server = smol_server
    body = generate(server.url, prompt, max_new_tokens=24, details=True)
    assert body["generated_text"] == expected.text == "The capital of France is Paris."
    assert [t["id"] for t in body["details"]["tokens"]] == expected.token_ids
    assert body["details"]["finish_reason"] == "eos_token"
    events = stream(server.url, prompt, max_new_tokens=24)
    assert "".join(e["token"]["text"] for e in events) == expected.text
    assert events[-1]["generated_text"] == expected.text
    assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_stream_and_plain_equal_offline(tiny_server, tiny_llm):
    prompt = "The quick brown fox"
    expected = tiny_llm.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))[0].outputs[0]
    body = generate(tiny_server.url, prompt, max_new_tokens=20, ignore_eos=True, details=True)
    assert body["generated_text"] == expected.text
    assert [t["id"] for t in body["details"]["tokens"]] == expected.token_ids
    events = stream(tiny_server.url, prompt, max_new_tokens=20, ignore_eos=True)
    assert [e["token"]["id"] for e in events] == expected.token_ids
    assert events[-1]["generated_text"] == expected.text
    assert events[-1]["details"]["finish_reason"] == "length"


def test_64_concurrent_mixed_requests(tiny_server, tiny_llm):
    rng = random.Random(7)
    words = "alpha beta gamma delta river stone cloud seven orange quiet".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 120))) for _ in range(64)]
    lengths = [rng.randint(1, 40) for _ in range(64)]
    expected = tiny_llm.generate(prompts, [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths])

    async def run_all():
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(p, n):
                r = await client.post(tiny_server.url + "/generate", json={
                    "inputs": p, "parameters": {"max_new_tokens": n, "ignore_eos": True, "details": True}})
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

    bodies = asyncio.run(run_all())
    for body, exp, n in zip(bodies, expected, lengths):
        assert body["details"]["generated_tokens"] == n
        assert [t["id"] for t in body["details"]["tokens"]] == exp.outputs[0].token_ids
        assert body["generated_text"] == exp.outputs[0].text
    wait_pool_free(tiny_server.url)


def test_stop_string_across_tokens_never_leaks(tiny_server, tiny_llm):
    prompt = "Once upon a time"
    full = tiny_llm.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True))[0].outputs[0]
    pieces = [tiny_llm.tokenizer.decode([t]) for t in full.token_ids]
    # A stop string made of the end of one token's text and the start of the next one's.
    i = next(i for i in range(5, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    cut = full.text.index(stop)
    body = generate(tiny_server.url, prompt, max_new_tokens=40, ignore_eos=True, stop=[stop], details=True)
    assert body["generated_text"] == full.text[:cut]
    assert body["details"]["finish_reason"] == "stop_sequence"
    events = stream(tiny_server.url, prompt, max_new_tokens=40, ignore_eos=True, stop=[stop])
    streamed = "".join(e["token"]["text"] for e in events)
    assert streamed == full.text[:cut] and stop not in streamed
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    wait_pool_free(tiny_server.url)


def test_disconnect_mid_stream_frees_kv(tiny_server):
    total = metric(tiny_server.url, "lightserve_kv_slots_total")
    for _ in range(3):
        with httpx.stream("POST", tiny_server.url + "/generate_stream", timeout=60, json={
                "inputs": "Tell me a long story", "parameters": {"max_new_tokens": 800, "ignore_eos": True}}) as r:
            for n, line in enumerate(r.iter_lines()):
                if n > 10:
                    break  # leave mid-stream: the connection closes here
    wait_pool_free(tiny_server.url)
    assert metric(tiny_server.url, "lightserve_kv_slots_total") == total


@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (json.dumps({"inputs": 5}).encode(), "inputs"),
    (json.dumps({"inputs": ""}).encode(), "inputs"),
    (json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": -3}}).encode(), "max_new_tokens"),
    (json.dumps({"inputs": "hi", "parameters": {"temperature": "hot"}}).encode(), "temperature"),
    (json.dumps({"inputs": "hi", "parameters": {"top_p": 7}}).encode(), "top_p"),
    (json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 10**9}}).encode(), "max_new_tokens"),
    (json.dumps({"inputs": "word " * 1500}).encode(), "inputs"),
], ids=["malformed-json", "inputs-not-string", "empty-prompt", "negative-max-new", "temperature-string",
        "top-p-out-of-range", "absurd-max-new", "prompt-too-long"])
def test_bad_input_is_422_and_server_keeps_serving(tiny_server, body, param):
    r = httpx.post(tiny_server.url + "/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["error_type"] == "validation" and err["error"]
    if param:
        assert param in err["error"]
    assert generate(tiny_server.url, "still there?", max_new_tokens=3)["generated_text"] is not None


def _shm_segments() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if "lightserve" in f}


def test_two_servers_side_by_side_and_clean_sigterm(tiny_server, tiny_served_model):
    """A second instance beside the shared one: its own private run directory, the same answers;
    SIGTERM stops it cleanly and leaves the first serving."""
    a = tiny_server
    b = ServerProcess(tiny_served_model, *TINY_SERVER_FLAGS)
    b_dir = b.run_dir()
    try:
        run_dirs = {a.run_dir(), b_dir}
        assert None not in run_dirs and len(run_dirs) == 2
        for d in run_dirs:
            assert os.stat(d).st_mode & 0o777 == 0o700
        ra = generate(a.url, "hello there", max_new_tokens=8, ignore_eos=True)
        rb = generate(b.url, "hello there", max_new_tokens=8, ignore_eos=True)
        assert ra == rb
    finally:
        code = b.stop()
    assert code == 0
    # Children (incl. multiprocessing's resource tracker) exit once the launcher is gone.
    _, alive = psutil.wait_procs(b.children, timeout=5)
    assert not alive
    assert not os.path.exists(b_dir)
    # Only this instance's segments: other instances (the shared server) hold theirs meanwhile.
    assert not {f for f in _shm_segments() if f.startswith(shm.segment_prefix(b_dir))}
    assert generate(a.url, "hello there", max_new_tokens=8, ignore_eos=True) == ra


def test_router_logs_throughput_and_load_while_busy(tiny_server):
    # The shared server logs at info level, its router's stats line every 0.2 s (TINY_SERVER_FLAGS).
    # About 1.5 s of decoding: several stats intervals with the request running.
    generate(tiny_server.url, "a long answer please", max_new_tokens=600, ignore_eos=True)
    log = tiny_server.read_log()
    lines = re.findall(r"router: prompt ([\d.]+) tok/s, generation ([\d.]+) tok/s, (\d+) running, (\d+) waiting, "
                       r"KV ([\d.]+)% of 6000 slots", log)
    assert lines, log[-3000:]
    assert any(float(generated) > 0 and int(running) >= 1 for _, generated, running, _, _ in lines)
