"""Images end to end through real processes: httpserver intake -> cache manager -> visual -> router.

The test plays the httpserver (an `ImageIntake` and a PUSH socket to the visual server), the
router (a PULL socket bound at `paths.router_in`) and the detokenizer (a PULL socket at
`paths.detok_in`, where the visual server sends errors); the cache manager and the visual
server are the real processes. The forwarded requests are then run through lightserve's
LLaVA model, reading the embeddings from shared memory as the backend does, and compared with
transformers' `LlavaForConditionalGeneration.generate` on the same image and prompt.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as tmp
import transformers
import zmq
from PIL import Image

from lightserve.backend.image_inputs import read_embedding
from lightserve.cache_manager import shm
from lightserve.cache_manager.client import CacheClient
from lightserve.cache_manager.manager import start_cache_manager_process
from lightserve.cache_manager.protocol import ImageSpec
from lightserve.httpserver.errors import ApiError
from lightserve.httpserver.images import ImageIntake, ImageLimits, ImageSource, expand_image_tags
from lightserve.io_struct import AbortReq, BatchTokenOut, GenerateReq, ImageItem, SamplingParams
from lightserve.launcher import ChildGroup, free_port
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths
from lightserve.visual.spec import VisionSpec
from lightserve.visual.manager import start_visual_process
from tests import llava_factory
from tests.llava_factory import (IMAGE_TOKEN, TOKENS_PER_IMAGE, LlavaRunner, random_image,
                                 tp_rank_last_logits)

PROMPT = "User: <image>\nWhat is in this picture? Assistant:"
NEW_TOKENS = 8


# ---- fixtures ---------------------------------------------------------------------------------

class Pipeline:
    """Cache manager + visual server processes, with the test standing in for their peers."""

    def __init__(self, model_dir: Path, capacity: int, batch_size: int = 4, wait_s: float = 30.0,
                 limits: ImageLimits = ImageLimits()):
        self.paths = RunPaths.create()
        self.prefix = shm.segment_prefix(self.paths.run_dir)
        args = ServerArgs(model_dir=str(model_dir), device="cpu", data_type="float32", enable_multimodal=True,
                          cache_capacity=capacity, visual_infer_batch_size=batch_size, log_level="warning")
        self.ctx = zmq.Context()
        self.router = self._bind(self.paths.router_in)
        self.detok = self._bind(self.paths.detok_in)
        self.children = ChildGroup()
        self.children.start([("cache_manager", start_cache_manager_process, (args, self.paths)),
                             ("visual", start_visual_process, (args, self.paths, str(model_dir)))])
        self.to_visual = self.ctx.socket(zmq.PUSH)
        self.to_visual.connect(self.paths.visual_in)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.cache = CacheClient(self.paths)
        self.intake = ImageIntake(CacheClient(self.paths), VisionSpec.from_model_dir(model_dir), IMAGE_TOKEN, limits, wait_s)
        self._ids = itertools.count()

    def _bind(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.PULL)
        sock.bind(address)
        return sock

    def submit(self, prompt: str, images: list[bytes], max_new_tokens: int = NEW_TOKENS) -> GenerateReq:
        """What the httpserver does for a request with images."""
        ids = self.tokenizer.encode(prompt)
        inputs = [ImageSource("base64", base64.b64encode(b).decode()) for b in images]
        prepared = asyncio.run(self.intake.prepare(ids, inputs))
        items = asyncio.run(self.intake.acquire(prepared))
        req = GenerateReq(next(self._ids), prepared.prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                          images=items)
        self.to_visual.send(serde.dumps(req))
        return req

    def abort(self, req: GenerateReq) -> None:
        self.to_visual.send(serde.dumps(AbortReq(req.req_id)))

    def router_messages(self, done: Callable[[list], bool], timeout_s: float = 30.0) -> list:
        """Messages reaching the router until `done(messages)` holds."""
        got: list = []
        deadline = time.monotonic() + timeout_s
        while not done(got):
            left = deadline - time.monotonic()
            assert left > 0, f"router got only {got}"
            if self.router.poll(int(left * 1000)):
                got.append(serde.ROUTER_IN.decode(self.router.recv()))
        return got

    def forwarded(self, n: int, timeout_s: float = 30.0) -> list[GenerateReq]:
        msgs = self.router_messages(lambda got: len(got) >= n, timeout_s)
        assert all(isinstance(m, GenerateReq) for m in msgs), msgs
        return msgs

    def detok_messages(self, n: int, timeout_s: float = 30.0) -> list:
        got = []
        while len(got) < n:
            assert self.detok.poll(int(timeout_s * 1000)), f"detokenizer got only {got}"
            got.append(serde.DETOK_IN.decode(self.detok.recv()))
        return got

    def refs(self, req: GenerateReq) -> list[int]:
        return [s.refs for s in self.cache.status([img.record_id for img in req.images])]

    def release(self, *reqs: GenerateReq) -> None:
        for req in reqs:
            self.intake.release(req.images)
        for req in reqs:
            wait_until(lambda r=req: all(n == 0 for n in self.refs(r)) or not self.cache.status([r.images[0].record_id])[0].exists)

    def close(self) -> None:
        self.intake.close()
        self.cache.close()
        self.children.stop_all()
        self.ctx.destroy(linger=0)
        self.paths.remove()
        left = list(shm.list_segments(self.prefix))
        assert not left, f"shared-memory segments left after shutdown: {left}"


def wait_until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def pipe(llava_dir):
    p = Pipeline(llava_dir, capacity=50)
    yield p
    p.close()


# ---- the LLaVA language model through lightserve ------------------------------------------------

def hf_generate(hf_llava, prompt: str, images: list[bytes], steps: int = NEW_TOKENS) -> tuple[list[int], list[int]]:
    """(expanded prompt ids, generated ids) from transformers."""
    return llava_factory.hf_generate(hf_llava, prompt, images, steps)


def hf_image_features(hf_llava, image: bytes) -> torch.Tensor:
    model, processor = hf_llava
    pixels = processor.image_processor(images=[Image.open(io.BytesIO(image))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                             vision_feature_select_strategy="default")
    return out.pooler_output[0]


@pytest.fixture(scope="module")
def runner(llava_dir) -> LlavaRunner:
    return LlavaRunner(llava_dir)


def check_stored_embedding(pipe: Pipeline, hf_llava, req: GenerateReq, images: list[bytes]) -> None:
    for item, image in zip(req.images, images):
        stored = read_embedding(pipe.prefix, item.record_id, item.token_num, 64)
        torch.testing.assert_close(stored, hf_image_features(hf_llava, image), atol=1e-5, rtol=1e-5)


# ---- tests ------------------------------------------------------------------------------------

def test_prompt_expansion_matches_the_processor(hf_llava):
    _, processor = hf_llava
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    prompt = "A <image> and B <image>\nsame?"
    pil = [Image.open(io.BytesIO(random_image(i, 30, 30))) for i in range(2)]
    expected = processor(images=pil, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    ids, starts = expand_image_tags(tokenizer.encode(prompt), image_id, TOKENS_PER_IMAGE, 2, IMAGE_TOKEN)
    assert ids == expected
    for s in starts:
        assert ids[s - 1] != image_id and ids[s : s + TOKENS_PER_IMAGE] == [image_id] * TOKENS_PER_IMAGE


def test_greedy_output_matches_transformers_generate(pipe, hf_llava, runner):
    image = random_image(1, 64, 48)
    req = pipe.submit(PROMPT, [image])
    (fwd,) = pipe.forwarded(1)
    assert fwd == req
    expected_prompt, expected = hf_generate(hf_llava, PROMPT, [image])
    assert fwd.prompt_ids == expected_prompt
    check_stored_embedding(pipe, hf_llava, fwd, [image])
    assert runner.greedy([fwd], pipe.prefix, NEW_TOKENS)[0] == expected
    # The image matters: the same prompt with another image answers differently.
    _, other = hf_generate(hf_llava, PROMPT, [random_image(2, 64, 48)])
    assert other != expected
    pipe.release(fwd)


def test_same_image_in_ten_requests_is_encoded_once(pipe):
    image = random_image(3, 50, 50)
    before = pipe.cache.stats()
    # The first request names the image twice: one record, encoded once within one batch too.
    reqs = [pipe.submit("<image> or <image>?", [image, image])] + [pipe.submit(PROMPT, [image]) for _ in range(9)]
    fwd = pipe.forwarded(10)
    assert sorted(r.req_id for r in fwd) == sorted(r.req_id for r in reqs)
    assert len({img.record_id for r in reqs for img in r.images}) == 1
    after = pipe.cache.stats()
    assert after.images_encoded - before.images_encoded == 1
    assert pipe.refs(reqs[1]) == [11]
    pipe.release(*reqs)
    assert pipe.refs(reqs[1]) == [0]


def test_several_images_in_one_request_are_one_batch(pipe, hf_llava, runner):
    images = [random_image(10 + i, 40 + 9 * i, 60 - 5 * i) for i in range(3)]
    prompt = "First <image>, second <image>, third <image>. Which is brightest?"
    before = pipe.cache.stats()
    pipe.submit(prompt, images)
    (fwd,) = pipe.forwarded(1)
    after = pipe.cache.stats()
    assert after.images_encoded - before.images_encoded == 3
    assert after.encode_batches - before.encode_batches == 1
    expected_prompt, expected = hf_generate(hf_llava, prompt, images)
    assert fwd.prompt_ids == expected_prompt
    assert runner.greedy([fwd], pipe.prefix, NEW_TOKENS)[0] == expected
    pipe.release(fwd)


def test_different_images_in_one_batch_all_correct(pipe, hf_llava, runner):
    # Odd sizes and modes: a 1x1 image, grayscale, RGBA (composited on white by the processor), JPEG.
    images = [random_image(20, 1, 1), random_image(21, 90, 33, mode="L"), random_image(22, 41, 77, mode="RGBA"),
              random_image(23, 64, 64, fmt="JPEG")]
    prompts = [PROMPT, "<image> Caption:", "Look: <image>", "Q: what colour?\n<image>\nA:"]
    reqs = [pipe.submit(p, [img]) for p, img in zip(prompts, images)]
    fwd = sorted(pipe.forwarded(4), key=lambda r: r.req_id)
    assert fwd == reqs
    got = runner.greedy(fwd, pipe.prefix, NEW_TOKENS)  # one packed prefill per step, 4 requests
    for req, prompt, image, tokens in zip(fwd, prompts, images, got):
        expected_prompt, expected = hf_generate(hf_llava, prompt, [image])
        assert req.prompt_ids == expected_prompt
        assert tokens == expected, prompt
    pipe.release(*fwd)


def hf_last_logits(hf_llava, prompt: str, images: list[bytes]) -> torch.Tensor:
    model, processor = hf_llava
    inputs = processor(images=[Image.open(io.BytesIO(b)) for b in images], text=prompt, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


def test_tensor_parallel_prefill_splices_the_embeddings(pipe, hf_llava, llava_dir):
    cases = [(PROMPT, [random_image(30, 48, 48)]), ("<image><image> Two?", [random_image(31, 40, 40)] * 2)]
    reqs = [pipe.submit(prompt, images) for prompt, images in cases]
    fwd = sorted(pipe.forwarded(2), key=lambda r: r.req_id)
    assert fwd == reqs
    expected = torch.stack([hf_last_logits(hf_llava, prompt, images) for prompt, images in cases])
    port = free_port()
    ctx = tmp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=tp_rank_last_logits, args=(r, port, str(llava_dir), fwd, pipe.prefix, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = torch.from_numpy(results.get(timeout=120))
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    pipe.release(*fwd)


def test_request_aborted_while_its_image_is_encoded(pipe):
    big = random_image(40, 1600, 1200)  # 5 MB of noise: ~0.25 s to decode, resize and encode
    before = pipe.cache.stats().images_encoded
    aborted = pipe.submit(PROMPT, [big])
    time.sleep(0.02)  # the visual server is now (most likely) encoding it
    pipe.abort(aborted)
    follower = pipe.submit(PROMPT, [random_image(41, 30, 30)])
    msgs = pipe.router_messages(lambda got: any(isinstance(m, GenerateReq) and m.req_id == follower.req_id for m in got))
    ids = [(type(m).__name__, m.req_id) for m in msgs]
    encoded = pipe.cache.stats().images_encoded - before - 1  # the follower's image is the other one
    if ("GenerateReq", aborted.req_id) in ids:
        # Encoded and forwarded before the abort was read: the abort follows it on the same socket.
        assert ids.index(("AbortReq", aborted.req_id)) > ids.index(("GenerateReq", aborted.req_id))
    else:
        # Dropped by the visual server: after encoding (the embedding stays cached) or before.
        assert encoded in (0, 1)
    # The httpserver drops the references of an ended request; the record is then evictable.
    pipe.release(aborted, follower)
    assert pipe.refs(aborted) == [0]


def test_undecodable_bytes_in_the_cache_fail_only_their_request(pipe):
    # Bytes that bypassed the httpserver's checks: the visual server must end the request with
    # an error (through the detokenizer) and keep serving.
    junk = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    rid = pipe.cache.alloc([ImageSpec("0" * 32, len(junk), TOKENS_PER_IMAGE)])[0].record_id
    assert pipe.cache.put_data(rid, junk)
    ids = pipe.tokenizer.encode("x") + [pipe.intake.spec.image_token_id] * TOKENS_PER_IMAGE
    bad = GenerateReq(999, ids, SamplingParams(temperature=0.0), images=[ImageItem("0" * 32, rid, len(ids) - TOKENS_PER_IMAGE, TOKENS_PER_IMAGE)])
    pipe.to_visual.send(serde.dumps(bad))
    registered, outs = pipe.detok_messages(2)
    assert registered == bad
    assert isinstance(outs, BatchTokenOut) and outs.outs[0].req_id == 999
    assert "cannot decode image" in outs.outs[0].error
    good = pipe.submit(PROMPT, [random_image(50, 32, 32)])
    assert pipe.forwarded(1) == [good]
    pipe.cache.release([rid])
    pipe.release(good)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no real pixel data (a bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _flat_jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _b64(data: bytes) -> ImageSource:
    return ImageSource("base64", base64.b64encode(data).decode())


@pytest.mark.parametrize("inputs, prompt, message", [
    ([_b64(b"\x89PNG\r\n\x1a\n" + bytes(200))], PROMPT, "image 0: "),
    ([ImageSource("base64", "data:image/png;base64," + base64.b64encode(b"just text in a .png\n").decode())], PROMPT,
     "image 0: not an image"),
    ([_b64(random_image(60, 64, 64)[:300])], PROMPT, "image 0: corrupt image data"),
    ([_b64(_png_header_only(30000, 30000))], PROMPT, "image 0: too many pixels; the limit is 1000000"),
    ([_b64(_flat_jpeg(1100, 1000))], PROMPT,
     "image 0: 1100x1000 = 1100000 pixels; the limit is 1000000"),
    ([_b64(bytes(201_000))], PROMPT, "image 0: 201000 bytes; the limit is 200000"),
    ([_b64(bytes(300_000))], PROMPT, "image 0: larger than 200000 bytes"),  # refused before decoding
    ([ImageSource("base64", "not base64!")], PROMPT, "image 0: not valid base64"),
    ([ImageSource("base64", "data:text/plain;base64,aGk=")], PROMPT, "not an image"),
    ([ImageSource("file", "/etc/passwd")], PROMPT, "type 'file' is not supported"),
    ([_b64(random_image(64, 8, 8, fmt="TIFF"))], PROMPT, "not an image in a format this server reads"),
    ([ImageSource("url", "https://example.com/cat.png")], PROMPT, "remote image URLs are disabled"),
    ([_b64(random_image(62, 8, 8))] * 3, PROMPT + "<image><image>", "3 images; at most 2 per request"),
    ([_b64(random_image(63, 8, 8))] * 2, PROMPT, "the prompt has 1 image tags (<image>) for 2 images"),
    ([], PROMPT, "the prompt has 1 image tags (<image>) for 0 images"),
])
def test_bad_images_are_422(pipe, inputs, prompt, message):
    intake = ImageIntake(CacheClient(pipe.paths), pipe.intake.spec, IMAGE_TOKEN,
                         ImageLimits(max_bytes=200_000, max_pixels=1_000_000, max_images=2))
    with pytest.raises(ApiError) as err:
        asyncio.run(intake.prepare(pipe.tokenizer.encode(prompt), inputs))
    intake.close()
    assert err.value.status_code == 422
    assert message in err.value.message


def test_capacity_two_with_five_images_evicts_and_answers_all(llava_dir, hf_llava):
    small = Pipeline(llava_dir, capacity=2, limits=ImageLimits(max_images=3))
    try:
        images = [random_image(70 + i, 36 + 5 * i, 40) for i in range(5)]
        reference = {i: hf_image_features(hf_llava, img) for i, img in enumerate(images)}
        by_md5: dict[str, int] = {}
        submitted: list[GenerateReq] = []

        def client(i: int) -> None:
            req = small.submit(PROMPT, [images[i]])  # waits while both records are referenced
            by_md5[req.images[0].md5] = i
            submitted.append(req)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for _ in range(5):
            (fwd,) = small.forwarded(1)
            assert small.cache.stats().records <= 2
            wait_until(lambda: fwd.images[0].md5 in by_md5)
            stored = read_embedding(small.prefix, fwd.images[0].record_id, TOKENS_PER_IMAGE, 64)
            torch.testing.assert_close(stored, reference[by_md5[fwd.images[0].md5]], atol=1e-5, rtol=1e-5)
            small.release(fwd)
        for t in threads:
            t.join(30)
        stats = small.cache.stats()
        assert len(submitted) == 5
        assert (stats.records, stats.referenced, stats.evictions, stats.images_encoded) == (2, 0, 3, 5)

        # Both records referenced: a third image waits, then is refused with 429 ...
        held = [small.submit(PROMPT, [img]) for img in images[:2]]
        small.forwarded(2)
        impatient = ImageIntake(CacheClient(small.paths), small.intake.spec, IMAGE_TOKEN, ImageLimits(max_images=3), wait_s=0.2)
        prepared = asyncio.run(impatient.prepare(small.tokenizer.encode(PROMPT), [_b64(images[2])]))
        with pytest.raises(ApiError) as err:
            asyncio.run(impatient.acquire(prepared))
        assert err.value.status_code == 429
        # ... and more distinct images than the cache holds can never fit: 422 at once.
        many = asyncio.run(impatient.prepare(small.tokenizer.encode(PROMPT * 3), [_b64(img) for img in images[:3]]))
        with pytest.raises(ApiError) as err:
            asyncio.run(impatient.acquire(many))
        assert err.value.status_code == 422
        small.release(*held)
        assert len(asyncio.run(impatient.acquire(prepared))) == 1  # space again
        impatient.close()
    finally:
        small.close()
