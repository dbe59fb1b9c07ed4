"""The server under load, under abandoned streams, losing a child process, and stopped by a signal.

- 500 requests from 100 concurrent clients whose KV demand is 10x the pool, with a small waiting
  queue: every request completes or gets 429 (never a 5xx), KV use never passes the pool, the
  router never holds more than running + waiting, and the pool is full again at the end.
- 100 streams cut at random points: their KV is free within a second of the last one leaving.
- A child (backend rank, router, detokenization) killed with SIGKILL: the request in flight ends
  with an error event, /health answers 503, the server exits within 10 s with one log line
  naming the child and its exit code, and leaves no process, socket file or shared memory.
- SIGTERM with requests in flight: each one completes or ends with an error, then a clean exit.
- A request the ranks cannot serve (a router driving a real engine over rpyc, and a request handed
  straight to the running server's router) is refused alone at the ranks' admission, with an error
  and one log line; a step that raises fails every running request; either way the KV is freed
  and the server goes on. The router makes exactly one call per rank per step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import psutil
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from rpyc.utils.server import ThreadedServer
from starlette.testclient import TestClient
from transformers import AutoTokenizer

from lightserve.backend.engine import ModelEngine
from lightserve.backend.worker import ModelWorkerService, RankRunner
from lightserve.utils.rpc import RPYC_CONFIG
from lightserve.httpserver.app import build_app
from lightserve.httpserver.manager import HttpServerManager
from lightserve.io_struct import BatchTokenOut, GenerateReq, SamplingParams, TokenOut
from lightserve.launcher import launch
from lightserve.router.manager import BATCH_FAILED, RouterManager
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths
from tests.server_harness import ServerProcess, assert_stopped_after_child_death, kill_child_mid_stream, shm_of
from tests.test_server_e2e import metric, wait_pool_free

POOL = 2000
RUNNING, WAITING = 64, 8
LOAD_FLAGS = ("--data_type", "float32", "--max_total_token_num", str(POOL), "--max_req_total_len", "256",
              "--running_max_req_size", str(RUNNING), "--max_waiting_reqs", str(WAITING), "--log_level", "warning")


@pytest.fixture(scope="module")
def load_server(tiny_served_model):
    with ServerProcess(tiny_served_model, *LOAD_FLAGS) as server:
        yield server


# ---- load ------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    completed: int = 0
    overloaded: int = 0
    unexpected: list[str] = field(default_factory=list)
    peak_kv: float = 0.0
    peak_router_reqs: float = 0.0


async def _client(client: httpx.AsyncClient, model: str, prompts: list[str], new_tokens: int, openai: bool,
                  result: LoadResult) -> None:
    for prompt in prompts:
        if openai:
            r = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": new_tokens,
                                                           "ignore_eos": True})
        else:
            r = await client.post("/generate", json={"inputs": prompt, "parameters": {
                "max_new_tokens": new_tokens, "ignore_eos": True, "details": True}})
        body = r.json()
        if r.status_code == 200:
            got = body["usage"]["completion_tokens"] if openai else body["details"]["generated_tokens"]
            if got == new_tokens:
                result.completed += 1
                continue
        elif r.status_code == 429 and (body["error"]["type"] == "server_error" if openai
                                       else body["error_type"] == "overloaded"):
            result.overloaded += 1
            continue
        result.unexpected.append(f"{r.status_code} {r.text[:200]}")


async def _watch_metrics(url: str, result: LoadResult, stop: asyncio.Event) -> None:
    """Peaks of the router's gauges; one scrape's gauges come from one RouterStats, so they agree."""
    async with httpx.AsyncClient(base_url=url) as client:
        while not stop.is_set():
            samples = {}
            for family in text_string_to_metric_families((await client.get("/metrics")).text):
                for sample in family.samples:
                    samples[sample.name] = sample.value
            result.peak_kv = max(result.peak_kv, samples["lightserve_kv_slots_used"])
            result.peak_router_reqs = max(result.peak_router_reqs, samples["lightserve_running_requests"]
                                          + samples["lightserve_waiting_requests"])
            await asyncio.sleep(0.02)


def test_500_requests_at_10x_the_pool_complete_or_get_429(load_server, tiny_served_model) -> None:
    url = load_server.url
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_served_model)
    rng = random.Random(11)
    words = "alpha beta gamma delta river stone cloud seven orange quiet".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(500)]
    new_tokens = 30
    demand = sum(len(tokenizer.encode(p)) + new_tokens for p in prompts)
    assert demand >= 10 * POOL

    async def run() -> LoadResult:
        result, stop = LoadResult(), asyncio.Event()
        watcher = asyncio.create_task(_watch_metrics(url, result, stop))
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            await asyncio.wait_for(asyncio.gather(*(
                _client(client, model, prompts[c::100], new_tokens, openai=c % 4 == 3, result=result)
                for c in range(100))), 180)
        stop.set()
        await watcher
        return result

    result = asyncio.run(run())
    assert not result.unexpected, result.unexpected[:5]
    assert result.completed + result.overloaded == 500
    assert result.overloaded > 0 and result.completed > RUNNING + WAITING
    total = metric(url, "lightserve_kv_slots_total")
    assert 0 < result.peak_kv <= total == POOL
    assert result.peak_router_reqs <= RUNNING + WAITING
    wait_pool_free(url)


# ---- abandoned streams -----------------------------------------------------------------------


async def _cut_stream(client: httpx.AsyncClient, model: str, cut_after: int, openai: bool) -> None:
    """Read `cut_after` events of a long stream, then leave (closing the connection)."""
    if openai:
        request = client.stream("POST", "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 200,
            "ignore_eos": True, "stream": True})
    else:
        request = client.stream("POST", "/generate_stream", json={
            "inputs": "Tell me a story", "parameters": {"max_new_tokens": 200, "ignore_eos": True}})
    async with request as r:
        assert r.status_code == 200
        events = 0
        async for line in r.aiter_lines():
            if events >= cut_after:
                return
            events += line.startswith("data:")


def test_100_streams_cut_at_random_points_free_their_kv_within_a_second(load_server) -> None:
    url = load_server.url
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    rng = random.Random(5)
    cuts = [rng.randint(0, 60) for _ in range(100)]

    async def run() -> None:
        gate = asyncio.Semaphore(50)  # below the in-flight bound: every stream is admitted

        async def one(i: int) -> None:
            async with gate:
                # A fresh connection per stream: leaving closes it, as a real client's exit does.
                async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                    await _cut_stream(client, model, cuts[i], openai=i % 2 == 1)

        await asyncio.gather(*(one(i) for i in range(100)))

    asyncio.run(run())
    # Idle from here on: every stream has left.
    wait_pool_free(url, timeout_s=1.0)


# ---- a child dies ----------------------------------------------------------------------------


def test_fail_all_turns_health_503_and_ends_running_streams_with_an_error(tiny_served_model) -> None:
    """The supervisor's call, from its own thread, on the app itself (no children needed)."""
    args = ServerArgs(model_dir=str(tiny_served_model), max_total_token_num=1000, max_req_total_len=256)
    paths = RunPaths.create()
    manager = HttpServerManager(args, paths, AutoTokenizer.from_pretrained(tiny_served_model))
    reason = "child process router died (exit code -9)"
    try:
        with TestClient(build_app(manager, args)) as client:
            assert client.get("/health").status_code == 200
            # No router runs: the request waits in flight until the failure ends it.
            def supervisor() -> None:  # fails the server once the request is in flight
                deadline = time.monotonic() + 30
                while manager.running_requests == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                manager.fail_all(reason)

            threading.Thread(target=supervisor, daemon=True).start()
            with client.stream("POST", "/generate_stream", json={"inputs": "Hello"}) as r:
                events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
            assert events == [{"error": reason, "error_type": "generation"}]
            health = client.get("/health")
            assert health.status_code == 503 and reason in health.json()["error"]
            assert client.post("/generate", json={"inputs": "Hello"}).status_code == 503
            r = client.post("/v1/completions", json={"model": Path(tiny_served_model).name, "prompt": "Hello"})
            assert r.status_code == 503 and reason in r.json()["error"]["message"]
    finally:
        paths.remove()


@pytest.mark.parametrize("child,socket_name", [
    ("backend-rank0", "worker0.rpyc"), ("router", "router.sock"), ("detokenization", "detok.sock"),
])
def test_a_killed_child_fails_requests_and_stops_the_server_cleanly(tiny_served_model, child: str,
                                                                   socket_name: str) -> None:
    server = ServerProcess(tiny_served_model, "--data_type", "float32", "--max_total_token_num", "4000",
                           "--log_level", "warning")
    try:
        run_dir = server.run_dir()
        events, killed_at = kill_child_mid_stream(server, socket_name, {
            "inputs": "Hello", "parameters": {"max_new_tokens": 1000, "ignore_eos": True}})
        # From the death on, /health says 503 (until the server closes).
        health = []
        for _ in range(3):
            try:
                health.append(httpx.get(server.url + "/health", timeout=2).status_code)
            except httpx.TransportError:
                break
        assert set(health) <= {503}
        assert_stopped_after_child_death(server, run_dir, child, events, killed_at)
    finally:
        server.stop()


# ---- stopped by a signal ---------------------------------------------------------------------


def _ends_cleanly(kind: str, outcome: object) -> bool:
    """A request a stopping server had in flight completed or ended with an error it was told about."""
    if kind == "plain":
        status, body = outcome
        return status == 200 or (status >= 500 and set(body) == {"error", "error_type"})
    events = outcome
    return bool(events) and ("error" in events[-1] or events[-1].get("details") is not None)


def test_sigterm_with_requests_in_flight_ends_each_one_then_exits_cleanly(tiny_served_model) -> None:
    # Requests still running are failed 1 s after the signal, the server closes at 2 s.
    server = ServerProcess(tiny_served_model, "--data_type", "float32", "--max_total_token_num", "20000",
                           "--max_req_total_len", "4096", "--graceful_shutdown_s", "2", "--log_level", "warning")
    long = {"inputs": "Hello", "parameters": {"max_new_tokens": 4000, "ignore_eos": True}}
    outcomes: list[tuple[str, object]] = []

    async def plain(client: httpx.AsyncClient) -> None:
        try:
            r = await client.post("/generate", json=long)
            outcomes.append(("plain", (r.status_code, r.json())))
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            outcomes.append(("plain", (0, repr(exc))))

    async def stream(client: httpx.AsyncClient, started: asyncio.Event) -> None:
        events: list[dict] = []
        try:
            async with client.stream("POST", "/generate_stream", json=long) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        events.append(json.loads(line[5:]))
                        started.set()
        except httpx.TransportError:
            pass  # cut: the events so far do not end cleanly
        outcomes.append(("stream", events))

    async def run() -> float:
        started = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            tasks = [asyncio.create_task(stream(client, started)) for _ in range(2)]
            tasks.append(asyncio.create_task(plain(client)))
            await asyncio.wait_for(started.wait(), 30)
            # To the launcher's whole process group, as `timeout` or `kill -TERM -PGID` send it:
            # it must reach the launcher alone (the children run in sessions of their own).
            os.killpg(server.proc.pid, signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.gather(*tasks)
            return signalled

    try:
        run_dir = server.run_dir()
        signalled = asyncio.run(run())
        assert server.proc.wait(15) == 0
        assert time.monotonic() - signalled < 8  # the 2 s grace, then the children stop
        assert all(_ends_cleanly(kind, outcome) for kind, outcome in outcomes), outcomes
        log = server.read_log()
        assert "Traceback" not in log and "died" not in log, log[-3000:]
        _, alive = psutil.wait_procs(server.children, timeout=5)
        assert not alive
        assert not os.path.exists(run_dir)
        assert shm_of(run_dir) == []
    finally:
        server.stop()


def test_a_negative_grace_stops_start_up_with_a_message(caplog) -> None:
    with caplog.at_level(logging.ERROR, logger="lightserve"):
        assert launch(ServerArgs(graceful_shutdown_s=-1.0)) == 1
    assert "--graceful_shutdown_s must be a number of seconds >= 0" in caplog.text


# ---- one failing batch never kills the router ---------------------------------------------------


class RouterOverEngine:
    """A real RouterManager driving a real engine over rpyc (the engine served in this process on
    the router's worker socket), with the detokenizer's socket bound here to read what it sends."""

    def __init__(self, run_dir: Path, model_dir: Path, engine_pool: int, router_pool: int):
        self.paths = RunPaths(str(run_dir))
        args = ServerArgs(device="cpu", data_type="float32", max_total_token_num=engine_pool,
                          max_req_total_len=128, running_max_req_size=8, router_max_wait_tokens=1)
        self.engine = ModelEngine(args, str(model_dir))
        self.runner = RankRunner(self.engine)
        self.rpyc_server = ThreadedServer(ModelWorkerService(self.runner),
                                          socket_path=self.paths.worker_socket(0), protocol_config=RPYC_CONFIG,
                                          auto_register=False)
        threading.Thread(target=self.rpyc_server.start, daemon=True).start()
        self.ctx = zmq.Context()
        self.detok = self.ctx.socket(zmq.PULL)
        self.detok.bind(self.paths.detok_in)
        # The router believes in its own pool size: more than the engine's makes decode run out.
        self.router = RouterManager(replace(args, max_total_token_num=router_pool), self.paths, router_pool)
        self.outs: dict[int, list[TokenOut]] = {}

    def add(self, req_id: int, max_new_tokens: int, **sampling: object) -> None:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **sampling)
        self.router.add_request(GenerateReq(req_id=req_id, prompt_ids=list(range(10, 20)), sampling=params))
        self.outs[req_id] = []

    def run(self, max_steps: int = 200) -> None:
        """Step until nothing runs or waits, collecting what reaches the detokenizer."""
        for _ in range(max_steps):
            if not self.router.scheduler.has_work:
                break
            self.router.step()
        while self.detok.poll(200):  # ipc delivers asynchronously: wait until it goes quiet
            msg = serde.DETOK_IN.decode(self.detok.recv())
            if isinstance(msg, BatchTokenOut):
                for out in msg.outs:
                    self.outs[out.req_id].append(out)

    def kv_free(self) -> bool:
        cache = self.engine.prefix_cache  # unused cached entries are as good as free
        return (self.engine.mem.can_use_mem_size + cache.evictable_tokens == self.engine.mem.size
                and cache.protected_tokens == 0 and self.engine.num_running == 0)

    def close(self) -> None:
        self.router.close()
        self.rpyc_server.close()
        self.ctx.destroy(linger=0)


def _finished_normally(outs: list[TokenOut], n: int) -> bool:
    return len(outs) == n and all(o.error is None for o in outs) and outs[-1].finish_reason is not None


def _failed_with_error(outs: list[TokenOut], error: str = BATCH_FAILED) -> bool:
    return bool(outs) and outs[-1].error.startswith(error) and "Traceback" not in outs[-1].error


def test_a_request_the_ranks_refuse_fails_alone_and_the_router_serves_on(tmp_path, tiny_served_model,
                                                                         caplog) -> None:
    """A request that got past the door with a setting the engine cannot serve (more logprob
    alternatives than allowed) is refused by the ranks at admission and fails alone; the running
    request goes on, every KV slot comes back, and each router step was one call to the rank."""
    harness = RouterOverEngine(tmp_path, tiny_served_model, engine_pool=512, router_pool=512)
    try:
        harness.add(1, 12)
        harness.router.step()  # request 1 is running
        harness.add(2, 4, logprobs=10**6)  # validate() refuses it; the router is handed it anyway
        with caplog.at_level(logging.ERROR, logger="lightserve.router.scheduler"):
            harness.run()
        assert _failed_with_error(harness.outs[2], "the backend cannot serve this request: `logprobs`")
        assert len(harness.outs[2]) == 1
        assert _finished_normally(harness.outs[1], 12), harness.outs[1]
        assert harness.kv_free()
        assert [r.message for r in caplog.records if "refused by the backend" in r.message][0].count("\n") == 0
        assert harness.runner.calls == harness.router.scheduler.steps == 12
        harness.add(3, 5)  # and the router still serves
        harness.run()
        assert _finished_normally(harness.outs[3], 5) and harness.kv_free()
    finally:
        harness.close()


def test_a_decode_that_raises_fails_the_running_batch_frees_its_kv_and_serving_goes_on(tmp_path,
                                                                                     tiny_served_model) -> None:
    """The engine's pool is smaller than the router believes, so a decode step runs out of KV
    (KVCacheFull raised in the backend): every running request fails with an error, the batch's
    slots are freed, and the next request is served."""
    harness = RouterOverEngine(tmp_path, tiny_served_model, engine_pool=40, router_pool=4000)
    try:
        harness.add(1, 30)
        harness.add(2, 30)
        harness.run()
        for req_id in (1, 2):
            outs = harness.outs[req_id]
            assert _failed_with_error(outs) and all(o.error is None for o in outs[:-1]), outs
        assert harness.kv_free()
        harness.add(3, 5)
        harness.run()
        assert _finished_normally(harness.outs[3], 5) and harness.kv_free()
    finally:
        harness.close()


def test_a_request_the_backend_cannot_serve_fails_alone_in_the_real_server(load_server) -> None:
    """The same failure in the running server: a request handed straight to the router process
    (as a buggy or future front end could) is refused by the ranks. It fails alone with one log
    line; the stream in flight completes, the server stays up, the pool empties."""
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 150, "ignore_eos": True, "details": True}}
    bad = GenerateReq(req_id=10**12, prompt_ids=list(range(10, 20)),
                      sampling=SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=10**6))
    ctx = zmq.Context()
    inject = ctx.socket(zmq.PUSH)
    inject.connect(RunPaths(load_server.run_dir()).router_in)
    events: list[dict] = []
    try:
        with httpx.stream("POST", load_server.url + "/generate_stream", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 1:
                        inject.send(serde.dumps(bad))
    finally:
        ctx.destroy(linger=0)
    assert len(events) == 150 and events[-1]["details"]["finish_reason"] == "length", events[-1]
    assert load_server.proc.poll() is None
    assert httpx.get(load_server.url + "/health").status_code == 200
    wait_pool_free(load_server.url)
    log = load_server.read_log()
    assert log.count("refused by the backend") == 1 and "Traceback" not in log, log[-2000:]
