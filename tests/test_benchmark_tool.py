"""The serving benchmark (`python -m lightserve.benchmark`): workload, statistics, the transformers
baseline, and a short run of the HTTP client against the real server."""

from __future__ import annotations

import asyncio
import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from lightserve.benchmark.cli import main, served_model
from lightserve.benchmark.client import Api, LoadResult, RequestRecord, arrival_offsets, run_conversations, run_load
from lightserve.benchmark.hf_baseline import fifo_batches, left_pad, run_hf_baseline
from lightserve.benchmark.report import workload_summary, write_json
from lightserve.benchmark.stats import inter_token_latencies, percentile, summarize, tpot, ttft
from lightserve.benchmark.workload import (
    BenchRequest, Conversation, FollowUp, LengthSpec, PromptBuilder, WorkloadShape, conversation_workload, load_jsonl,
    next_turn_prompt, prompt_lengths, synthetic_workload,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


# ---- workload ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, lo, hi, dist", [("128", 128, 128, "uniform"), ("32:512", 32, 512, "uniform"),
                                                 ("10:20:normal", 10, 20, "normal")])
def test_length_spec_parse_and_sample_within_bounds(text, lo, hi, dist):
    spec = LengthSpec.parse(text)
    assert (spec.lo, spec.hi, spec.dist) == (lo, hi, dist)
    assert str(spec) == text
    rng = random.Random(1)
    values = [spec.sample(rng) for _ in range(2000)]
    assert min(values) >= lo and max(values) <= hi
    if hi > lo:  # the whole range is reachable, not one value
        assert len(set(values)) > (hi - lo) // 2


@pytest.mark.parametrize("text", ["", "0:5", "9:3", "1:2:3:4", "a:b", "5:9:zipf"])
def test_length_spec_rejects_bad_text(text):
    with pytest.raises(ValueError):
        LengthSpec.parse(text)


def test_synthetic_prompts_have_exact_token_lengths(tokenizer):
    requests = synthetic_workload(tokenizer, 24, LengthSpec(1, 300), LengthSpec(5, 50), seed=3)
    for req in requests:
        # What the server computes from `inputs`: the tokenizer with its special tokens.
        assert tokenizer.encode(req.prompt) == list(req.prompt_ids)
        assert 1 <= req.prompt_len <= 300 and 5 <= req.output_len <= 50
    assert len({r.prompt_len for r in requests}) > 10


def test_synthetic_workload_is_seeded(tokenizer):
    make = lambda seed: synthetic_workload(tokenizer, 8, LengthSpec(16, 64), LengthSpec(4, 32), seed)
    assert make(7) == make(7)
    assert make(7) != make(8)


def test_prompt_length_counts_the_tokens_the_tokenizer_adds(smollm2_dir):
    from tokenizers.processors import TemplateProcessing

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    # A BOS-adding tokenizer (as Llama's): the BOS is part of the prompt length the server sees.
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    builder = PromptBuilder(tok)
    assert builder.special_overhead == 1
    rng = random.Random(0)
    for length in (2, 17, 200):
        text, ids = builder.build(length, rng)
        assert len(tok.encode(text)) == length and ids[0] == 1
    with pytest.raises(ValueError):
        builder.build(1, rng)
    # A shared prefix of 10 tokens holds the BOS and 9 words; the prompts on it start with all 10.
    _, prefix = builder.build(10, rng)
    for length in (11, 40):
        text, ids = builder.build(length, rng, prefix)
        assert tok.encode(text) == ids and len(ids) == length and ids[:10] == prefix
    with pytest.raises(ValueError):
        builder.build(10, rng, prefix)  # no room after the prefix


def test_prompt_lengths_repaired_when_words_merge(tokenizer):
    # Half of the pool are word pieces without a leading space ("ing", "er"): they glue onto their
    # neighbours, so raw draws do not round-trip and `build` has to re-tokenize and trim or extend.
    builder = PromptBuilder(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    glue = [i for i, p in enumerate(pieces) if p and p.isalpha() and p.islower() and len(p) >= 2][:2000]
    builder.pool = builder.pool[:2000] + glue
    rng = random.Random(0)
    raw = [[rng.choice(builder.pool) for _ in range(100)] for _ in range(5)]
    assert all(len(tokenizer.encode(tokenizer.decode(ids))) != 100 for ids in raw)
    for length in (5, 100, 300):
        text, ids = builder.build(length, rng)
        assert tokenizer.encode(text) == ids and len(ids) == length
    # On a shared prefix, a first word that glues onto the prefix's last one is drawn again.
    _, prefix = builder.build(50, rng)
    for length in (51, 120, 300):
        text, ids = builder.build(length, rng, prefix)
        assert tokenizer.encode(text) == ids and len(ids) == length and ids[:50] == prefix


def test_shared_prefix_groups(tokenizer):
    make = lambda seed: synthetic_workload(tokenizer, 12, LengthSpec(5, 40), LengthSpec(2, 8), seed,
                                           shared_prefix_len=64, shared_prefix_groups=3)
    requests = make(4)
    for i, req in enumerate(requests):
        assert tokenizer.encode(req.prompt) == list(req.prompt_ids)  # what the server will see
        assert req.prompt_ids[:64] == requests[i % 3].prompt_ids[:64]  # round-robin groups share 64 ids
        assert 5 <= req.prompt_len - 64 <= 40 and 2 <= req.output_len <= 8
    assert len({r.prompt_ids[:64] for r in requests}) == 3
    assert all(r.prompt_ids[64:] != requests[0].prompt_ids[64:] for r in requests[1:])  # own suffixes
    # The lengths come from the seed alone: the suffixes are as long as the prompts without a prefix.
    plain = synthetic_workload(tokenizer, 12, LengthSpec(5, 40), LengthSpec(2, 8), 4)
    assert [(r.prompt_len - 64, r.output_len) for r in requests] == [(r.prompt_len, r.output_len) for r in plain]
    assert make(4) == requests and make(5) != requests


def test_multi_turn_workload_and_next_prompts(tokenizer):
    shape = WorkloadShape(shared_prefix_len=16, shared_prefix_groups=2, multi_turn=3)
    make = lambda seed: conversation_workload(tokenizer, 3, LengthSpec(4, 12), LengthSpec(2, 6), seed, shape)
    conversations = make(1)
    assert make(1) == conversations and make(2) != conversations
    assert [c.turns for c in conversations] == [3, 3, 3]
    assert conversations[0].first.prompt_ids[:16] == conversations[2].first.prompt_ids[:16]
    assert conversations[0].first.prompt_ids[:16] != conversations[1].first.prompt_ids[:16]
    for c in conversations:
        assert 16 + 4 <= c.first.prompt_len <= 16 + 12
        for follow_up in c.follow_ups:  # a user message inside the prompt: no special tokens of its own
            assert 4 <= len(tokenizer.encode(follow_up.user_message, add_special_tokens=False)) <= 12
            assert 2 <= follow_up.output_len <= 6
    # What the load generator does with the server's answers (here small made-up ones).
    prompt, lengths = conversations[0].first.prompt, [conversations[0].first.prompt_len]
    for answer, follow_up in zip([" the answer", "42."], conversations[0].follow_ups):
        following = next_turn_prompt(prompt, answer, follow_up.user_message)
        assert following.startswith(prompt + answer) and following.endswith(follow_up.user_message)
        lengths += prompt_lengths(tokenizer, [following])
        assert lengths[-1] == len(tokenizer.encode(following))
        prompt = following
    assert lengths == sorted(lengths) and len(set(lengths)) == 3


def test_workload_summary_states_the_shape():
    first = BenchRequest("x", (5, 6, 7), 4)
    shape = WorkloadShape(shared_prefix_len=2, shared_prefix_groups=1, multi_turn=3)
    chats = [Conversation(first, (FollowUp(" y", 5), FollowUp(" z", 6)))] * 2
    w = workload_summary(chats, shape)
    assert (w["num_requests"], w["conversations"], w["multi_turn"], w["shared_prefix_len"]) == (6, 2, 3, 2)
    assert w["first_turn_prompt_len"]["max"] == 3 and w["total_output_tokens"] == 2 * (4 + 5 + 6)
    assert "total_prompt_tokens" not in w  # later prompts hold the server's answers: unknown before the run
    single = workload_summary([Conversation(first)], WorkloadShape())
    assert (single["num_requests"], single["total_prompt_tokens"], single["multi_turn"]) == (1, 3, 0)


@pytest.mark.parametrize("flags", [["--multi-turn", "3", "--num-requests", "4"], ["--shared-prefix-groups", "2"],
                                   ["--multi-turn", "2", "--hf-baseline", "m"], ["--shared-prefix-len", "-1"]])
def test_cli_rejects_inconsistent_workload_flags(flags):
    with pytest.raises(SystemExit):
        main(["--tokenizer", "unused", *flags])


def test_load_jsonl(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Hello there, how are you?", "output_len": 7}, {"inputs": "Tell me a story."}, {},
             {"text": "Third one", "max_new_tokens": 3}]
    path.write_text("\n".join(json.dumps(x) if x else "" for x in lines) + "\n")
    requests = load_jsonl(path, tokenizer, LengthSpec(20, 30), seed=0)
    assert [r.prompt for r in requests] == ["Hello there, how are you?", "Tell me a story.", "Third one"]
    assert requests[0].output_len == 7 and 20 <= requests[1].output_len <= 30 and requests[2].output_len == 3
    assert list(requests[0].prompt_ids) == tokenizer.encode("Hello there, how are you?")
    assert len(load_jsonl(path, tokenizer, LengthSpec(20, 30), seed=0, limit=2)) == 2
    path.write_text(json.dumps({"question": "no prompt key"}) + "\n")
    with pytest.raises(ValueError, match="no prompt"):
        load_jsonl(path, tokenizer, LengthSpec(20, 30), seed=0)


# ---- arrivals and statistics ------------------------------------------------------------------


def test_arrival_offsets():
    assert arrival_offsets(5, math.inf, 0) == [0.0] * 5
    offsets = arrival_offsets(4000, 8.0, seed=1)
    assert offsets[0] == 0.0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    gaps = np.diff(offsets)
    assert abs(gaps.mean() - 1 / 8) < 0.01  # Poisson: exponential gaps, mean 1/rate
    assert abs(gaps.std() - 1 / 8) < 0.01  # an exponential's std equals its mean
    assert offsets == arrival_offsets(4000, 8.0, seed=1) and offsets != arrival_offsets(4000, 8.0, seed=2)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, 0)


def test_percentile_interpolates_between_ranks():
    values = list(range(1, 102))  # 101 values: rank k (0-based) holds k + 1
    random.Random(0).shuffle(values)
    assert percentile(values, 50) == 51 and percentile(values, 99) == 100 and percentile(values, 100) == 101
    assert percentile([1.0, 2.0], 50) == 1.5
    assert math.isnan(percentile([], 50))


def _record(index: int, start: float, token_times: list[float], end: float, prompt_len: int = 10,
            output_len: int | None = None, error: str | None = None) -> RequestRecord:
    return RequestRecord(index=index, prompt_len=prompt_len, output_len=output_len or len(token_times), start=start,
                         token_times=token_times, end=end, server_prompt_len=prompt_len,
                         finish_reason=None if error else "length", error=error)


def test_per_request_latencies_from_timestamps():
    rec = _record(0, start=1.0, token_times=[1.5, 1.6, 1.8, 2.1], end=2.2)
    assert ttft(rec) == pytest.approx(0.5)
    assert inter_token_latencies(rec) == pytest.approx([0.1, 0.2, 0.3])
    assert tpot(rec) == pytest.approx((2.1 - 1.5) / 3)
    one = _record(1, start=0.0, token_times=[0.4], end=0.5)
    assert tpot(one) is None and inter_token_latencies(one) == []


def test_summary_of_a_run():
    rng = random.Random(0)
    records = []
    for i in range(20):
        start = rng.uniform(0, 2)
        times = list(np.cumsum([rng.uniform(0.2, 0.4)] + [rng.uniform(0.01, 0.05) for _ in range(rng.randint(1, 9))]) + start)
        records.append(_record(i, start, times, times[-1] + 0.001, prompt_len=rng.randint(5, 50)))
    records.append(_record(20, 0.5, [0.9], 1.0, error="HTTP 500: boom"))
    records[3].server_prompt_len += 1  # the server saw another prompt length than the workload says
    result = LoadResult(request_rate=math.inf, max_concurrency=None, records=records, start=0.0, end=5.0)
    s = summarize(result)
    ok = records[:20]
    assert (s.completed, s.failed, s.errors) == (20, 1, ["HTTP 500: boom"])
    assert s.total_output_tokens == sum(len(r.token_times) for r in ok)
    assert s.total_input_tokens == sum(r.prompt_len for r in ok)
    assert s.output_throughput == pytest.approx(s.total_output_tokens / 5.0)
    assert s.request_throughput == pytest.approx(20 / 5.0)
    ttfts_ms = sorted((r.token_times[0] - r.start) * 1000 for r in ok)
    assert s.ttft_ms.mean == pytest.approx(sum(ttfts_ms) / 20)
    assert s.ttft_ms.p50 == pytest.approx((ttfts_ms[9] + ttfts_ms[10]) / 2)  # median of an even count
    gaps = [g for r in ok for g in np.diff(r.token_times)]
    assert s.itl_ms.count == len(gaps) and s.itl_ms.mean == pytest.approx(1000 * sum(gaps) / len(gaps))
    assert s.tpot_ms.count == 20 and s.prompt_len_mismatches == 1 and s.output_len_mismatches == 0


def test_json_has_no_nan(tmp_path):
    # One-token outputs have no TPOT/ITL: the JSON must still be strict JSON.
    records = [_record(0, 0.0, [0.3], 0.4)]
    s = summarize(LoadResult(2.0, 4, records, 0.0, 1.0))
    workload = workload_summary([Conversation(BenchRequest("x", (5,), 1))], WorkloadShape())
    write_json(tmp_path / "r.json", {"seed": 0}, workload, [s], None)
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["runs"][0]["tpot_ms"]["p50"] is None and data["runs"][0]["output_throughput"] == 1.0


# ---- transformers baseline --------------------------------------------------------------------


def test_fifo_batches_and_left_padding():
    reqs = [BenchRequest(str(i), tuple(range(3, 3 + n)), 1) for i, n in enumerate([2, 5, 3, 1, 4])]
    batches = fifo_batches(reqs, 2)
    assert [[r.prompt for r in b] for b in batches] == [["0", "1"], ["2", "3"], ["4"]]  # order kept, last short
    ids, mask = left_pad(batches[0], pad_id=0)
    assert ids.tolist() == [[0, 0, 0, 3, 4], [3, 4, 5, 6, 7]]
    assert mask.tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]


def test_hf_baseline_counts_only_requested_tokens(tiny_model_dirs):
    torch.manual_seed(0)
    reqs = [BenchRequest("", tuple(torch.randint(3, 300, (n,)).tolist()), out)
            for n, out in [(5, 3), (9, 7), (4, 2), (6, 6), (3, 4)]]
    hf = run_hf_baseline(str(tiny_model_dirs["llama"]), reqs, batch_size=2, dtype="float32", max_requests=4,
                         progress=False)
    assert (hf.requests_run, hf.requests_total, hf.batches, hf.subset) == (4, 5, 2, True)
    assert hf.useful_output_tokens == 3 + 7 + 2 + 6
    assert hf.generated_tokens == 2 * 7 + 2 * 6  # each batch runs to its longest output
    assert hf.useful_output_throughput == pytest.approx(hf.useful_output_tokens / hf.duration_s)


# ---- against the real server ------------------------------------------------------------------

def _max_overlap(records: list[RequestRecord]) -> int:
    edges = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def test_client_and_cli_against_the_server(tiny_server, tiny_served_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_served_model)
    requests = synthetic_workload(tok, 8, LengthSpec(8, 60), LengthSpec(2, 12), seed=5)
    server = tiny_server
    result = asyncio.run(run_load(server.url, requests, math.inf, max_concurrency=3, progress=False))
    for req, rec in zip(requests, result.records):
        assert rec.ok, rec.error
        assert rec.server_prompt_len == req.prompt_len  # the prompt the server saw has the planned length
        assert rec.generated == req.output_len  # ignore_eos pins the output length
        assert rec.start < rec.token_times[0] and rec.token_times == sorted(rec.token_times) and rec.token_times[-1] <= rec.end
    assert _max_overlap(result.records) <= 3
    s = summarize(result)
    assert s.completed == 8 and s.total_output_tokens == sum(r.output_len for r in requests)

    # Two conversations of three turns on one shared prefix: each later prompt holds the answers.
    chats = conversation_workload(tok, 2, LengthSpec(4, 8), LengthSpec(3, 5), seed=2,
                                  shape=WorkloadShape(shared_prefix_len=24, multi_turn=3))
    chat_result = asyncio.run(run_conversations(server.url, chats, tok, math.inf, max_concurrency=1, progress=False))
    assert [r.index for r in chat_result.records] == list(range(6))
    for turns in (chat_result.records[:3], chat_result.records[3:]):
        assert all(r.ok and r.server_prompt_len == r.prompt_len for r in turns)
        assert turns[0].prompt_len < turns[1].prompt_len < turns[2].prompt_len
        assert turns[0].end <= turns[1].start and turns[1].end <= turns[2].start  # one after another
    assert _max_overlap(chat_result.records) == 1  # the cap holds a conversation's slot through its turns

    # The OpenAI route, as vLLM and llama.cpp's server are driven: token-id prompts, the same lengths.
    api = Api("openai", served_model(server.url))
    openai_result = asyncio.run(run_load(server.url, requests, math.inf, max_concurrency=3, progress=False, api=api))
    for req, rec in zip(requests, openai_result.records):
        assert rec.ok, rec.error
        assert (rec.server_prompt_len, rec.generated) == (req.prompt_len, req.output_len)
        assert rec.finish_reason == "length" and rec.generated_text
    # Whole answers (--no-stream), both routes: the lengths are the server's, there are no token times.
    for whole in (Api("tgi", stream=False), Api("openai", api.model, stream=False)):
        whole_result = asyncio.run(run_load(server.url, requests, math.inf, max_concurrency=3, progress=False,
                                            api=whole))
        for req, rec in zip(requests, whole_result.records):
            assert rec.ok, (whole, rec.error)
            assert (rec.server_prompt_len, rec.generated, rec.token_times) == (req.prompt_len, req.output_len, [])
        s = summarize(whole_result)
        assert s.completed == 8 and s.ttft_ms.count == 0 and s.e2e_ms.count == 8
    openai_out = tmp_path / "openai.json"
    rc = main(["--backend", "openai", "--base-url", server.url, "--tokenizer", str(tiny_served_model), "--no-stream",
               "--num-requests", "4", "--multi-turn", "2", "--prompt-len", "4:8", "--output-len", "2:4",
               "--no-progress", "--output-json", str(openai_out)])
    assert rc == 0
    run = json.loads(openai_out.read_text())["runs"][0]
    assert run["completed"] == 4 and run["prompt_len_mismatches"] == 0
    assert 0 < run["client_cpu_s"] < run["duration_s"] * 2  # the client's own CPU, at most 2 cores' worth

    out = tmp_path / "bench.json"
    rc = main(["--url", server.url, "--tokenizer", str(tiny_served_model), "--num-requests", "6",
               "--prompt-len", "8:40", "--output-len", "3:6", "--request-rate", "50,inf", "--max-concurrency", "4",
               "--no-progress", "--output-json", str(out)])
    assert rc == 0
    chat_out = tmp_path / "chat.json"
    rc = main(["--url", server.url, "--tokenizer", str(tiny_served_model), "--num-requests", "4",
               "--multi-turn", "2", "--shared-prefix-len", "20", "--shared-prefix-groups", "2",
               "--prompt-len", "4:8", "--output-len", "2:4", "--max-concurrency", "2", "--no-progress",
               "--output-json", str(chat_out), "--output-png", str(tmp_path / "chat.png")])
    assert rc == 0
    chat = json.loads(chat_out.read_text())
    w = chat["workload"]
    assert (w["num_requests"], w["conversations"], w["multi_turn"]) == (4, 2, 2)
    assert (w["shared_prefix_len"], w["shared_prefix_groups"]) == (20, 2) and w["first_turn_prompt_len"]["min"] >= 24
    run = chat["runs"][0]
    assert run["completed"] == 4 and run["prompt_len_mismatches"] == 0
    assert run["total_output_tokens"] == w["total_output_tokens"]
    assert run["total_input_tokens"] > 2 * w["first_turn_prompt_len"]["mean"] * 2  # later turns are longer
    data = json.loads(out.read_text())
    assert [r["request_rate"] for r in data["runs"]] == [50.0, "inf"]
    for run in data["runs"]:
        assert run["completed"] == 6 and run["failed"] == 0 and run["prompt_len_mismatches"] == 0
        assert run["total_output_tokens"] == data["workload"]["total_output_tokens"]
        assert run["ttft_ms"]["p50"] > 0 and run["output_throughput"] > 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
