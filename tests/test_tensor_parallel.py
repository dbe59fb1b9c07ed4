"""Tensor parallelism at tp=2 on CPU (gloo): per-layer outputs and served tokens equal tp=1."""

from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import torch.multiprocessing as tmp
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from lightserve import LLM, SamplingParams
from lightserve.backend.engine import ModelEngine
from lightserve.backend.parallel import TensorParallel
from lightserve.io_struct import GenerateReq, Grammar
from lightserve.server_args import ServerArgs
from tests.engine_steps import decode, prefill
from tests.server_harness import SMOL_SERVER_FLAGS, ServerProcess

PROMPTS = [[5, 9, 33, 7, 120, 64, 3], list(range(10, 41))]


def _engine_args(quantization: str = "none") -> ServerArgs:
    return ServerArgs(device="cpu", data_type="float32", attention_backend="torch", max_total_token_num=500,
                      max_req_total_len=128, running_max_req_size=4, quantization=quantization)


def _layer_outputs(engine: ModelEngine, decode_steps: int = 2) -> list[torch.Tensor]:
    """Hidden states after every layer, for one prefill and a few decode steps."""
    seen: list[torch.Tensor] = []
    for layer in engine.model.layers:
        original = layer.forward

        def recording(hidden, state, kv, _original=original):
            out = _original(hidden, state, kv)
            seen.append(out.detach().clone())
            return out

        layer.forward = recording
    reqs = [GenerateReq(req_id=i, prompt_ids=p, sampling=SamplingParams(max_new_tokens=10, temperature=0.0))
            for i, p in enumerate(PROMPTS)]
    # The first prompt whole, the second in chunks of 5 beside the first one's decode rows.
    prefill(engine, reqs[:1])
    prefill(engine, reqs[1:], chunk=5, decode=True)
    for _ in range(decode_steps):
        decode(engine)
    return seen


# (family, quantization) pairs one pair of rank processes runs in turn: spawning and importing
# torch twice costs more than the engines themselves.
TP_CASES = [("llama", "none"), ("qwen2", "none"), ("llama", "w8a8")]


def _rank_main(rank: int, port: int, model_dirs: list[str], results) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for model_dir, (_, quantization) in zip(model_dirs, TP_CASES):
        engine = ModelEngine(_engine_args(quantization), model_dir, TensorParallel(rank, 2))
        outs = _layer_outputs(engine)
        if rank == 0:
            results.put([t.numpy() for t in outs])
    torch.distributed.destroy_process_group()


def test_layer_outputs_tp2_match_tp1(tiny_model_dirs):
    """Float: within rounding (the ranks' partial sums add in another order). W8A8: bit for bit,
    since the row-parallel layers quantize with the whole row's absmax and sum exact int32."""
    model_dirs = [str(tiny_model_dirs[family]) for family, _ in TP_CASES]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, model_dirs, results)) for r in range(2)]
    for p in procs:
        p.start()
    for model_dir, (family, quantization) in zip(model_dirs, TP_CASES):
        expected = _layer_outputs(ModelEngine(_engine_args(quantization), model_dir))
        got = results.get(timeout=120)
        assert len(got) == len(expected)
        tol = dict(atol=0, rtol=0) if quantization == "w8a8" else dict(atol=1e-4, rtol=1e-4)
        for i, (g, e) in enumerate(zip(got, expected)):
            torch.testing.assert_close(torch.from_numpy(g), e, **tol, msg=f"{family} {quantization}: layer output {i}")
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def test_uneven_head_split_and_clear_errors():
    # SmolLM2's 9 heads / 3 KV heads at tp=2: whole KV groups per rank, 2 + 1.
    splits = [TensorParallel(r, 2).head_split(9, 3) for r in range(2)]
    assert [(s.q_start, s.q_end, s.kv_start, s.kv_end) for s in splits] == [(0, 6, 0, 2), (6, 9, 2, 3)]
    with pytest.raises(ValueError, match="--tp 4 exceeds the number of key/value heads \\(3\\)"):
        TensorParallel(0, 4).head_split(9, 3)


def _generate(url: str, prompt: str, n: int) -> dict:
    r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_smollm2_tp2_server_token_exact_with_tp1(smollm2_dir, smol_server):
    """The tp=1 answers come from the session's SmolLM2 server (same flags but --tp; it is itself
    held token-exact with the offline LLM by test_server_e2e)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=False) for q in questions]
    expected = _generate_together(smol_server.url, prompts, 24)
    with ServerProcess(smollm2_dir, "--tp", "2", *SMOL_SERVER_FLAGS) as server:
        # The prompts share the chat template's system prompt. The first runs alone; the other two
        # then hit its system prompt and, batched with them, the first comes back whole: both
        # ranks serve all three from their prefix caches, which must stay identical.
        answers = _generate_together(server.url, prompts[:1], 24)
        answers += _generate_together(server.url, prompts[1:] + prompts[:1], 24)
        for body, exp in zip(answers, expected + expected[:1]):
            assert [t["id"] for t in body["details"]["tokens"]] == [t["id"] for t in exp["details"]["tokens"]]
            assert body["generated_text"] == exp["generated_text"]
        hits = next(s.value for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
                    for s in f.samples if s.name == "lightserve_prefix_cache_hits_total")
        prompt_tokens = len(tokenizer(prompts[0]).input_ids)
        assert hits >= prompt_tokens - 1 + 2 * 20  # the repeat, and the system prompt twice


def _generate_together(url: str, prompts: list[str], n: int) -> list[dict]:
    """`prompts` sent at once (the server batches them); the answers in prompt order."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _generate(url, p, n), prompts))


def test_two_nodes_on_loopback_serve_a_request(tiny_served_model, tiny_llm_expected):
    """Two launchers, one rank each: node 1 runs only its rank, driven by node 0's rank 0."""
    import subprocess
    import sys

    from tests.server_harness import free_port

    addr = f"127.0.0.1:{free_port()}"
    common = ["--tp", "2", "--nnodes", "2", "--dist_init_addr", addr, "--data_type", "float32",
              "--max_total_token_num", "4000", "--log_level", "warning"]
    node1 = subprocess.Popen([sys.executable, "-m", "lightserve.api_server", "--model_dir", str(tiny_served_model),
                              "--device", "cpu", "--node_rank", "1", *common])
    try:
        with ServerProcess(tiny_served_model, "--node_rank", "0", *common) as node0:
            prompt, expected, constrained, scored = tiny_llm_expected
            body = _generate(node0.url, prompt, len(expected.token_ids))
            assert [t["id"] for t in body["details"]["tokens"]] == expected.token_ids
            # Prompt logprobs: the logits are gathered across the ranks, rank 0 reports them.
            r = httpx.post(node0.url + "/generate", timeout=120, json={"inputs": prompt, "parameters": {
                "max_new_tokens": 1, "decoder_input_details": True}})
            prefill = r.json()["details"]["prefill"]
            assert [t["id"] for t in prefill] == scored.prompt_token_ids
            assert [t["logprob"] for t in prefill[1:]] == pytest.approx(scored.prompt_logprobs.logprobs, abs=1e-4)
            # Structured output: each rank runs its own grammar matchers, which must stay in step.
            r = httpx.post(node0.url + "/generate", timeout=120, json={"inputs": prompt, "parameters": {
                "max_new_tokens": 60, "do_sample": True, "seed": 3, "details": True,
                "grammar": {"type": "regex", "value": TP_REGEX}}})
            assert [t["id"] for t in r.json()["details"]["tokens"]] == constrained.token_ids
            assert re.fullmatch(TP_REGEX, r.json()["generated_text"])
        assert node1.wait(30) == 0  # node 1 stops by itself when node 0 goes away
    finally:
        if node1.poll() is None:
            node1.kill()


@pytest.fixture(scope="module")
def tiny_llm_expected(tiny_served_model):
    llm = LLM(str(tiny_served_model), data_type="float32", device="cpu", max_total_token_num=4000)
    prompt = "The river runs"
    out = llm.generate(prompt, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))[0].outputs[0]
    constrained = llm.generate(prompt, SamplingParams(max_new_tokens=60, temperature=1.0, seed=3,
                                                      grammar=Grammar("regex", TP_REGEX)))[0].outputs[0]
    scored = llm.generate(prompt, SamplingParams(max_new_tokens=1, temperature=0.0, prompt_logprobs=0))[0]
    return prompt, out, constrained, scored


TP_REGEX = "[a-z]{1,8}( [a-z]{1,8}){2,5}\\."


def test_a_dying_rank_takes_the_server_down_cleanly(tiny_served_model):
    import signal
    import time

    import psutil

    server = ServerProcess(tiny_served_model, "--tp", "2", "--data_type", "float32", "--max_total_token_num", "4000",
                           "--log_level", "warning")
    try:
        rank1 = next(c for c in server.children
                     if any(conn.laddr.endswith("worker1.rpyc") for conn in c.net_connections(kind="unix")))
        run_dir = server.run_dir()
        rank1.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        assert server.proc.wait(10) == 1
        assert time.monotonic() - t0 < 10
        assert "backend-rank1 died" in server.read_log()
        _, alive = psutil.wait_procs(server.children, timeout=5)
        assert not alive
        assert not __import__("os").path.exists(run_dir)
    finally:
        server.stop()
