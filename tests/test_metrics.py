"""`GET /metrics`: what each request adds to the counters and histograms, and the router's gauges.

First `ServerMetrics` fed by hand with `TextOut`s (every outcome, exact numbers), then a real
server after a known workload through both APIs, parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lightserve.httpserver.metrics import ServerMetrics
from lightserve.io_struct import FinishReason, RouterStats, TextOut

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def out(i: int, finish: Optional[FinishReason] = None, error: Optional[str] = None) -> TextOut:
    return TextOut(req_id=0, text=f"t{i}", token_id=i, logprob=-1.0, finish_reason=finish, prompt_tokens=11,
                   completion_tokens=i + 1, error=error)


# ---- ServerMetrics alone ---------------------------------------------------------------------


@pytest.mark.parametrize("outputs,outcome,tokens", [
    ([out(0), out(1), out(2, FinishReason.LENGTH)], "success", 3),
    ([out(0, FinishReason.EOS)], "success", 1),
    ([out(0), out(1, FinishReason.STOP)], "success", 2),
    ([out(0), out(1)], "cancelled", 2),  # the handler left before the last token
    ([], "cancelled", 0),  # left while the request was still queued
    ([out(0), out(-1, FinishReason.ABORT, error="backend died")], "error", 1),
    ([out(-1, FinishReason.ABORT, error="refused")], "error", 0),
    ([out(0), out(1, FinishReason.ABORT)], "error", 2),  # aborted by the server, no message
])
def test_one_request_is_counted_once_with_its_outcome(outputs: list[TextOut], outcome: str, tokens: int) -> None:
    metrics = ServerMetrics()
    record = metrics.request_started()
    for o in outputs:
        if o.error is None:
            time.sleep(0.002)  # tokens arrive over time: the time per token must be positive
        record.on_output(o)
    record.end()
    s = parse(metrics.render().decode())
    assert {k: value(s, "lightserve_requests_total", outcome=k) for k in ("success", "error", "cancelled", "rejected")} \
        == {k: float(k == outcome) for k in ("success", "error", "cancelled", "rejected")}
    assert value(s, "lightserve_generation_tokens_total") == tokens
    assert value(s, "lightserve_prompt_tokens_total") == (11 if tokens else 0)  # counted once, with the first token
    assert value(s, "lightserve_time_to_first_token_seconds_count") == (1 if tokens else 0)
    assert value(s, "lightserve_time_per_output_token_seconds_count") == (1 if tokens >= 2 else 0)
    assert value(s, "lightserve_e2e_request_latency_seconds_count") == 1
    if tokens >= 2:
        assert 0 < value(s, "lightserve_time_per_output_token_seconds_sum") <= value(s, "lightserve_e2e_request_latency_seconds_sum")


def test_router_stats_set_the_gauges_and_queue_times() -> None:
    metrics = ServerMetrics()
    metrics.update_router(RouterStats(kv_total=100, kv_used=40, running_reqs=3, waiting_reqs=2, queue_times=[0.02, 0.3]))
    metrics.update_router(RouterStats(kv_total=100, kv_used=10, running_reqs=1, waiting_reqs=0, queue_times=[0.04]))
    s = parse(metrics.render().decode())
    assert [value(s, f"lightserve_{n}") for n in ("kv_slots_total", "kv_slots_used", "running_requests", "waiting_requests")] \
        == [100, 10, 1, 0]
    assert value(s, "lightserve_queue_time_seconds_count") == 3
    assert value(s, "lightserve_queue_time_seconds_sum") == pytest.approx(0.36)
    assert value(s, "lightserve_queue_time_seconds_bucket", le="0.025") == 1
    assert value(s, "lightserve_queue_time_seconds_bucket", le="0.05") == 2


# ---- a real server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def scrape(url: str) -> Samples:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def wait_for(url: str, check: Any, timeout_s: float = 10.0) -> Samples:
    """Scrape until `check(samples)` holds: the router's figures arrive a little after the answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "metrics did not reach the expected values"
        time.sleep(0.05)


def post(url: str, path: str, body: dict, status: int = 200) -> httpx.Response:
    r = httpx.post(url + path, json=body, timeout=120)
    assert r.status_code == status, r.text
    return r


def sse(r: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_known_workload_moves_the_counters_by_the_right_amounts(server) -> None:
    url = server.url
    idle = wait_for(url, lambda s: value(s, "lightserve_running_requests") == 0)
    before_queue = value(idle, "lightserve_queue_time_seconds_count")

    # The one-token request goes first: the router reports a request that ends within the step
    # that admitted it only with its next report, which the later requests cause.
    d = sse(post(url, "/v1/completions", {"model": "llama", "prompt": "one token", "max_tokens": 1, "ignore_eos": True,
                                          "stream": True, "stream_options": {"include_usage": True}}))
    a = post(url, "/generate", {"inputs": "alpha beta gamma", "parameters": {"max_new_tokens": 5, "ignore_eos": True,
                                                                             "details": True}}).json()
    b = sse(post(url, "/generate_stream", {"inputs": "delta", "parameters": {"max_new_tokens": 7, "ignore_eos": True}}))
    c = post(url, "/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "n": 2,
                                           "max_tokens": 4, "ignore_eos": True}).json()
    post(url, "/generate", {"inputs": "x", "parameters": {"top_p": 7}}, status=422)
    post(url, "/v1/completions", {"model": "llama", "prompt": "x", "tools": [{"type": "function"}]}, status=400)
    after = wait_for(url, lambda s: value(s, "lightserve_queue_time_seconds_count") >= before_queue + 5
                     and value(s, "lightserve_kv_slots_used") == 0)

    prompt_tokens = (a["details"]["prompt_tokens"] + b[-1]["details"]["input_length"] + 2 * c["usage"]["prompt_tokens"]
                     + d[-1]["usage"]["prompt_tokens"])  # the chat prompt is prefilled once per choice
    assert {k: delta(idle, after, "lightserve_requests_total", outcome=k) for k in ("success", "error", "cancelled", "rejected")} \
        == {"success": 5, "error": 0, "cancelled": 0, "rejected": 2}
    assert delta(idle, after, "lightserve_generation_tokens_total") == 5 + 7 + 2 * 4 + 1
    assert delta(idle, after, "lightserve_prompt_tokens_total") == prompt_tokens
    assert delta(idle, after, "lightserve_time_to_first_token_seconds_count") == 5
    assert delta(idle, after, "lightserve_e2e_request_latency_seconds_count") == 5
    assert delta(idle, after, "lightserve_time_per_output_token_seconds_count") == 4  # not the one-token request
    assert value(after, "lightserve_queue_time_seconds_count") == before_queue + 5
    ttft, e2e = (delta(idle, after, f"lightserve_{n}_sum") for n in ("time_to_first_token_seconds", "e2e_request_latency_seconds"))
    assert 0 < ttft < e2e
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        assert value(after, f"lightserve_{histogram}_bucket", le="+Inf") == value(after, f"lightserve_{histogram}_count")
    assert value(after, "lightserve_kv_slots_total") == 6000
    assert value(after, "lightserve_running_requests") == value(after, "lightserve_waiting_requests") == 0


def test_gauges_follow_a_running_request_and_a_cancel_is_counted(server) -> None:
    url = server.url
    before = wait_for(url, lambda s: value(s, "lightserve_running_requests") == 0)
    events = 0
    body = {"inputs": "a long story", "parameters": {"max_new_tokens": 800, "ignore_eos": True}}
    with httpx.stream("POST", url + "/generate_stream", json=body, timeout=60) as r:
        for line in r.iter_lines():
            events += line.startswith("data:")
            if events == 3:
                # The prompt's 3 tokens and the generated ones: the pool holds more than the prompt.
                wait_for(url, lambda s: value(s, "lightserve_running_requests") == 1
                         and value(s, "lightserve_kv_slots_used") > 3)
                break  # leave mid-stream: the request is aborted
    after = wait_for(url, lambda s: value(s, "lightserve_kv_slots_used") == 0
                     and delta(before, s, "lightserve_requests_total", outcome="cancelled") == 1)
    assert delta(before, after, "lightserve_requests_total", outcome="success") == 0
    assert delta(before, after, "lightserve_generation_tokens_total") >= events
    assert delta(before, after, "lightserve_e2e_request_latency_seconds_count") == 1
    assert value(after, "lightserve_running_requests") == 0


def test_prefix_cache_hits_are_reported_and_a_flush_empties_the_cache(server) -> None:
    """A repeated prompt is served from the prefix cache (all of it but the last token) with the
    same answer; `usage` and the counters say how many prompt tokens were hit, and after
    `/flush_cache` the cache holds nothing and the next request computes everything again."""
    url = server.url
    system = {"role": "system", "content": "You are a careful assistant. " * 12}

    def ask(question: str) -> dict:
        return post(url, "/v1/chat/completions", {"model": "llama", "messages": [system, {"role": "user", "content": question}],
                                                  "max_tokens": 6, "temperature": 0, "ignore_eos": True}).json()

    def cached(answer: dict) -> int:
        return answer["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert httpx.post(url + "/flush_cache").json()["status"] == "ok"
    before = wait_for(url, lambda s: value(s, "lightserve_prefix_cache_slots") == 0
                      and value(s, "lightserve_running_requests") == 0)
    first, again, other = ask("Name a colour."), ask("Name a colour."), ask("Name a fruit, please.")
    assert cached(first) == 0
    assert cached(again) == again["usage"]["prompt_tokens"] - 1  # a request computes at least its last token
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert 0 < cached(other) < other["usage"]["prompt_tokens"] - 1  # the system prompt, not the question
    answers = (first, again, other)
    after = wait_for(url, lambda s: delta(before, s, "lightserve_prefix_cache_hits_total") == sum(map(cached, answers))
                     and value(s, "lightserve_kv_slots_used") == 0)
    assert delta(before, after, "lightserve_prefix_cache_queries_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    # Two distinct prompts and their computed answers stay cached, their shared system prompt once.
    assert first["usage"]["prompt_tokens"] < value(after, "lightserve_prefix_cache_slots") \
        < first["usage"]["prompt_tokens"] + other["usage"]["prompt_tokens"] + 10

    assert httpx.post(url + "/flush_cache").status_code == 200
    wait_for(url, lambda s: value(s, "lightserve_prefix_cache_slots") == 0)
    assert cached(ask("Name a colour.")) == 0
