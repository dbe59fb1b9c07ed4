"""The multimodal path through the real server: a tiny random-weight LLaVA served over HTTP.

Greedy outputs are compared token for token with transformers'
`LlavaForConditionalGeneration.generate` on the same image and prompt, at tp=1 and tp=2. One
server (tp=1, an image cache of 2 records) serves most tests; the tp=2 server (which ends with
its visual server killed) and the one whose cache manager is killed are started on their own.
Every server must leave no shared-memory segment behind. Two pieces are checked without a server: the engine recomputing a paused
request with its images, and the fetch behind --allow_remote_images (against a local HTTP server).
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import re
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from lightserve.backend.engine import ModelEngine
from lightserve.cache_manager import shm
from lightserve.httpserver.errors import ApiError
from lightserve.httpserver.images import fetch_remote
from lightserve.io_struct import GenerateReq, ImageItem, SamplingParams
from lightserve.server_args import ServerArgs
from lightserve.visual.encoder import VisionEncoder
from lightserve.visual.spec import load_image
from tests.engine_steps import assert_kv_whole, decode, prefill, run_to_end
from tests.llava_factory import TOKENS_PER_IMAGE, hf_generate, random_image
from tests.server_harness import (ServerProcess, assert_stopped_after_child_death, child_owning, kill_child_mid_stream,
                                  shm_of)

PROMPT = "User: <image>\nWhat is in this picture? Assistant:"
QUESTION = "What is in this picture?"
NEW_TOKENS = 8
SERVER_ARGS = ("--enable_multimodal", "--data_type", "float32", "--max_total_token_num", "4000",
               "--log_level", "warning")


# ---- fixtures and helpers -----------------------------------------------------------------------

def _stopped_cleanly(server: ServerProcess, run_dir: str) -> None:
    assert server.stop() == 0
    assert not os.path.exists(run_dir)
    assert shm_of(run_dir) == []


@pytest.fixture(scope="module")
def server(llava_dir):
    """tp=1 with room for 2 images in the cache, so that eviction is exercised."""
    s = ServerProcess(llava_dir, *SERVER_ARGS, "--cache_capacity", "2")
    run_dir = s.run_dir()
    try:
        yield s
    finally:
        _stopped_cleanly(s, run_dir)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tgi_body(prompt: str, images: list[bytes], max_new_tokens: int = NEW_TOKENS, **parameters: Any) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True, **parameters},
            "multimodal_params": {"images": [{"type": "base64", "data": b64(i)} for i in images]}}


def generated_ids(server: ServerProcess, prompt: str, images: list[bytes]) -> list[int]:
    r = httpx.post(server.url + "/generate", json=tgi_body(prompt, images), timeout=120)
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"]]


def stream_ids(server: ServerProcess, path: str, body: dict) -> list[int]:
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1]["details"] is not None, events[-1]
    return [e["token"]["id"] for e in events]


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` (a decompression bomb's header) and carries no pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


# ---- answers --------------------------------------------------------------------------------------

def test_greedy_output_matches_transformers_on_every_tgi_route(server, hf_llava):
    image = random_image(1, 64, 48)
    _, expected = hf_generate(hf_llava, PROMPT, [image], NEW_TOKENS)
    assert generated_ids(server, PROMPT, [image]) == expected
    assert stream_ids(server, "/generate_stream", tgi_body(PROMPT, [image])) == expected
    r = httpx.post(server.url + "/", json=tgi_body(PROMPT, [image]), timeout=120)
    assert r.status_code == 200 and [t["id"] for t in r.json()[0]["details"]["tokens"]] == expected
    # A data: URI is as good as raw base64, and the image matters.
    uri = {**tgi_body(PROMPT, []), "multimodal_params": {"images": [{"type": "base64", "data": "data:image/png;base64," + b64(image)}]}}
    r = httpx.post(server.url + "/generate", json=uri, timeout=120)
    assert [t["id"] for t in r.json()["details"]["tokens"]] == expected
    assert generated_ids(server, PROMPT, [random_image(2, 64, 48)]) != expected


def test_same_image_in_ten_requests_is_encoded_once(server, hf_llava):
    image = random_image(3, 50, 50)
    before = metric(server, "lightserve_images_encoded_total")
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: generated_ids(server, PROMPT, [image]), range(10)))
    assert metric(server, "lightserve_images_encoded_total") - before == 1
    assert answers == [hf_generate(hf_llava, PROMPT, [image], NEW_TOKENS)[1]] * 10


def test_five_distinct_images_through_a_cache_of_two_all_answer(server, hf_llava):
    images = [random_image(10 + i, 40 + 4 * i, 44) for i in range(5)]
    evictions = metric(server, "lightserve_image_cache_evictions_total")
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda image: generated_ids(server, PROMPT, [image]), images))
    assert answers == [hf_generate(hf_llava, PROMPT, [image], NEW_TOKENS)[1] for image in images]
    assert metric(server, "lightserve_image_cache_evictions_total") - evictions >= 3
    assert metric(server, "lightserve_image_cache_records") <= 2


def test_the_same_text_with_another_image_reuses_only_the_text_before_it(server, hf_llava):
    """The prefix cache keys image positions by the image's md5: a second image shares only the
    tokens before it, and both answers are transformers'; the first image's prompt stays cached."""
    a, b = random_image(30, 48, 48), random_image(31, 48, 48)
    prompt_ids, expected_a = hf_generate(hf_llava, PROMPT, [a], NEW_TOKENS)
    expected_b = hf_generate(hf_llava, PROMPT, [b], NEW_TOKENS)[1]
    image_start = prompt_ids.index(hf_llava[1].tokenizer.convert_tokens_to_ids("<image>"))
    assert generated_ids(server, PROMPT, [a]) == expected_a
    hits = metric(server, "lightserve_prefix_cache_hits_total")
    assert generated_ids(server, PROMPT, [b]) == expected_b
    assert metric(server, "lightserve_prefix_cache_hits_total") - hits == image_start
    hits = metric(server, "lightserve_prefix_cache_hits_total")
    assert generated_ids(server, PROMPT, [a]) == expected_a
    assert metric(server, "lightserve_prefix_cache_hits_total") - hits == len(prompt_ids) - 1


def test_openai_chat_with_an_image_url_answers_the_same_tokens(server, hf_llava):
    image = random_image(4, 48, 40)
    tokenizer = hf_llava[1].tokenizer
    # The image part becomes the image tag, joined to the text part with a newline.
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\n" + QUESTION}],
                                             add_generation_prompt=True, tokenize=False)
    _, expected = hf_generate(hf_llava, rendered, [image], NEW_TOKENS)
    tgi = httpx.post(server.url + "/generate", json=tgi_body(rendered, [image]), timeout=120).json()
    assert [t["id"] for t in tgi["details"]["tokens"]] == expected
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(image)}},
               {"type": "text", "text": QUESTION}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": "llava", "messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == tgi["generated_text"]
    assert body["usage"]["completion_tokens"] == len(expected)


# ---- hostile images ---------------------------------------------------------------------------------

def _text_as_png() -> dict:
    return {"type": "base64", "data": "data:image/png;base64," + b64(b"just some text, not an image\n" * 20)}


@pytest.mark.parametrize("images,prompt,message", [
    ([{"type": "base64", "data": b64(random_image(5, 40, 40)[:120])}], PROMPT, "corrupt image"),
    ([{"type": "base64", "data": b64(bytes(range(256)))}], PROMPT, "not an image"),
    ([_text_as_png()], PROMPT, "not an image"),
    ([{"type": "base64", "data": b64(png_header_only(60000, 60000))}], PROMPT, "pixels; the limit is"),
    ([{"type": "base64", "data": "%%% not base64 %%%"}], PROMPT, "not valid base64"),
    ([{"type": "url", "data": "http://127.0.0.1:9/cat.png"}], PROMPT, "--allow_remote_images"),
    ([{"type": "file", "data": "/etc/passwd"}], PROMPT, "not supported"),
    ([{"type": "base64", "data": b64(random_image(6, 40, 40))}] * 5, "<image>" * 5, "at most 4 per request"),
    ([{"type": "base64", "data": b64(random_image(6, 40, 40))}], "no tag here", "image tags"),
], ids=["truncated_png", "random_bytes", "text_as_png", "bomb_header", "bad_base64", "remote_url", "unknown_type",
        "too_many", "no_tag"])
def test_bad_images_get_a_clear_422_and_the_server_keeps_serving(server, images, prompt, message):
    r = httpx.post(server.url + "/generate", timeout=60, json={
        "inputs": prompt, "parameters": {"max_new_tokens": 2}, "multimodal_params": {"images": images}})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and message in r.json()["error"], r.json()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_remote_image_url_in_chat_is_refused(server):
    content = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, {"type": "text", "text": "hi"}]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "llava", "messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert r.status_code in (400, 422) and "--allow_remote_images" in r.json()["error"]["message"], r.text


def test_remote_images_are_fetched_within_the_size_limit():
    """What --allow_remote_images does: GET the URL, reading no more than --max_image_bytes."""
    image = random_image(8, 40, 40)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert asyncio.run(fetch_remote(0, base + "/cat.png", len(image))) == image
        for url, limit, message in [(base + "/cat.png", len(image) - 1, "larger than"),
                                    (base + "/dog.png", len(image), "HTTP 404"),
                                    ("ftp://127.0.0.1/cat.png", len(image), r"only http\(s\)")]:
            with pytest.raises(ApiError, match=message) as err:
                asyncio.run(fetch_remote(0, url, limit))
            assert err.value.status_code == 422
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("width,height,fmt", [(1, 1, "PNG"), (3000, 2000, "JPEG")])
def test_tiny_and_large_images_answer_correctly(server, hf_llava, width, height, fmt):
    image = random_image(7, width, height, fmt=fmt)
    assert generated_ids(server, PROMPT, [image]) == hf_generate(hf_llava, PROMPT, [image], NEW_TOKENS)[1]


def test_the_router_and_the_cache_manager_do_not_load_torch(server):
    """Neither needs the model or the tokenizer (DESIGN §10): torch would cost each of them its
    import time and hundreds of MB. A backend rank, which does load it, shows the check works."""
    def maps(socket_name: str) -> str:
        return Path(f"/proc/{child_owning(server, socket_name).pid}/maps").read_text()

    assert "libtorch" not in maps("router.sock")
    assert "libtorch" not in maps("cache.rpyc")
    assert "libtorch" in maps("worker0.rpyc")


# ---- the engine: a paused request keeps its images --------------------------------------------------

def test_a_paused_request_is_recomputed_with_its_images(llava_dir, hf_llava):
    """Optimistic admission may pause a request (KV freed) and prefill it again later with the
    tokens it had generated: its image embeddings must be spliced in again, here in chunks
    whose first boundary falls in the middle of the image."""
    image = random_image(40, 48, 48)
    prompt_ids, expected = hf_generate(hf_llava, PROMPT, [image], NEW_TOKENS)
    prefix = f"lightserve_test{os.getpid()}_"
    embedding = VisionEncoder(llava_dir, torch.float32, torch.device("cpu")).encode([load_image(image)])[0].contiguous()
    shm.create(shm.embed_name(prefix, 1), embedding.numel() * 4)
    try:
        shm.write(shm.embed_name(prefix, 1), memoryview(embedding.numpy()).cast("B"))
        args = ServerArgs(device="cpu", data_type="float32", attention_backend="torch", max_total_token_num=1000,
                          enable_multimodal=True)
        engine = ModelEngine(args, str(llava_dir), shm_prefix=prefix)
        image_token = hf_llava[1].tokenizer.convert_tokens_to_ids("<image>")
        item = ImageItem("md5", 1, prompt_ids.index(image_token), TOKENS_PER_IMAGE)
        req = GenerateReq(0, prompt_ids, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0), images=[item])
        got = [out.token_id for out in prefill(engine, [req])[1]]
        got += [decode(engine)[0].token_id for _ in range(2)]
        engine.release([0])  # a pause: the router requeues it with the tokens it had generated
        assert_kv_whole(engine, flush=False)  # its KV went to the prefix cache (unused: the resume recomputes it)
        paused = GenerateReq(0, prompt_ids, req.sampling, images=[item], output_ids=list(got))
        chunk = item.token_start + TOKENS_PER_IMAGE // 2
        got += [out.token_id for out in prefill(engine, [paused], chunk)[1]]
        got += [out.token_id for out in run_to_end(engine)]
        assert got == expected
    finally:
        shm.unlink_all(prefix)


# ---- tensor parallel --------------------------------------------------------------------------------

def test_tensor_parallel_2_matches_transformers_and_dies_cleanly_with_its_visual_server(llava_dir, hf_llava):
    """tp=2 answers equal transformers'; then the visual server is killed under a stream, and the
    server goes down as any child death takes it down (the cache manager's case: below, at tp=1)."""
    s = ServerProcess(llava_dir, *SERVER_ARGS, "--tp", "2")
    try:
        run_dir = s.run_dir()
        images = [random_image(20 + i, 56, 40) for i in range(3)]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda image: generated_ids(s, PROMPT, [image]), images))
        assert answers == [hf_generate(hf_llava, PROMPT, [image], NEW_TOKENS)[1] for image in images]
        _kill_under_a_stream(s, run_dir, "visual", "visual.sock")
    finally:
        s.stop()


# ---- a child dies ----------------------------------------------------------------------------------

def test_a_killed_cache_manager_fails_requests_and_stops_the_server_cleanly(llava_dir):
    server = ServerProcess(llava_dir, *SERVER_ARGS)
    try:
        _kill_under_a_stream(server, server.run_dir(), "cache_manager", "cache.rpyc")
    finally:
        server.stop()


def _kill_under_a_stream(server: ServerProcess, run_dir: str, child: str, socket_name: str) -> None:
    body = tgi_body(PROMPT, [random_image(30, 40, 40)], max_new_tokens=400, ignore_eos=True)
    events, killed_at = kill_child_mid_stream(server, socket_name, body)
    assert_stopped_after_child_death(server, run_dir, child, events, killed_at)
