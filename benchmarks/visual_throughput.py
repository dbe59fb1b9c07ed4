"""Images per second through the visual server, beside transformers, same model, same run.

The real cache manager and visual server processes run with `--visual_infer_batch_size` B;
this script plays the httpserver (registers N distinct images with the cache manager, their
bytes in shared memory, before the clock starts) and the router (a PULL socket at
`paths.router_in`). Timed: sending the N requests until all N come back encoded, i.e. PNG
decode + image processor + vision tower + projector + shared-memory writes + the cache
manager round trips. The peer is transformers in this process on the same images in batches
of B: PNG decode, the same image processor, `LlavaModel.get_image_features`, with the same
number of torch threads as the visual server uses.

    python -m benchmarks.visual_throughput                  # tiny LLaVA, B = 1 and 4
    python -m benchmarks.visual_throughput --model_dir DIR --images 64 --batches 1 4 8
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
import transformers
import zmq
from PIL import Image

from lightserve.cache_manager.client import CacheClient
from lightserve.cache_manager.manager import start_cache_manager_process
from lightserve.httpserver.images import ImageIntake, ImageLimits, ImageSource
from lightserve.io_struct import GenerateReq, SamplingParams
from lightserve.launcher import ChildGroup
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.run_paths import RunPaths
from lightserve.visual.spec import VisionSpec
from lightserve.visual.manager import start_visual_process
from tests.llava_factory import build_tiny_llava, random_image


def visual_images_per_s(model_dir: str, images: list[bytes], batch: int, dtype: str) -> float:
    paths = RunPaths.create()
    args = ServerArgs(model_dir=model_dir, device="cpu", data_type=dtype, enable_multimodal=True,
                      cache_capacity=len(images) + 4, visual_infer_batch_size=batch, log_level="warning")
    ctx = zmq.Context()
    router = ctx.socket(zmq.PULL)
    router.bind(paths.router_in)
    children = ChildGroup()
    try:
        children.start([("cache_manager", start_cache_manager_process, (args, paths)),
                        ("visual", start_visual_process, (args, paths, model_dir))])
        to_visual = ctx.socket(zmq.PUSH)
        to_visual.connect(paths.visual_in)
        spec = VisionSpec.from_model_dir(model_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        tag = tokenizer.convert_ids_to_tokens(spec.image_token_id)
        intake = ImageIntake(CacheClient(paths), spec, tag, ImageLimits(max_images=1))
        prompt = tokenizer.encode(f"{tag} Describe.")
        ids = itertools.count()

        async def register(data: bytes) -> GenerateReq:
            prepared = await intake.prepare(prompt, [ImageSource("base64", base64.b64encode(data).decode())])
            items = await intake.acquire(prepared)
            return GenerateReq(next(ids), prepared.prompt_ids, SamplingParams(temperature=0.0), images=items)

        warmup = [asyncio.run(register(random_image(10_000 + i, 64, 64))) for i in range(batch)]
        reqs = [asyncio.run(register(data)) for data in images]

        def run(batch_reqs: list[GenerateReq]) -> float:
            t0 = time.perf_counter()
            for req in batch_reqs:
                to_visual.send(serde.dumps(req))
            for _ in batch_reqs:
                router.recv()
            return time.perf_counter() - t0

        run(warmup)
        elapsed = run(reqs)
        intake.close()
        return len(images) / elapsed
    finally:
        children.stop_all()
        ctx.destroy(linger=0)
        paths.remove()


def transformers_images_per_s(model_dir: str, images: list[bytes], batch: int, dtype: str) -> float:
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    cfg = model.config

    def encode(chunk: list[bytes]) -> None:
        pil = [Image.open(io.BytesIO(b)) for b in chunk]
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(torch_dtype)
        with torch.inference_mode():
            model.model.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy)

    encode(images[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        encode(images[i : i + batch])
    return len(images) / (time.perf_counter() - t0)


def report(model_dir: str, opts: argparse.Namespace) -> None:
    width, height = (int(v) for v in opts.size.split("x"))
    images = [random_image(i, width, height) for i in range(opts.images)]
    # The visual server takes half the cores (see visual/manager.py); the peer gets the same.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    print(f"model {model_dir}, {opts.images} images of {opts.size} ({sum(map(len, images)) / len(images) / 1024:.0f} KiB PNG), "
          f"{opts.dtype}, {torch.get_num_threads()} torch threads")
    print("batch | lightserve visual img/s | transformers img/s | ratio")
    for batch in opts.batches:
        ours = visual_images_per_s(model_dir, images, batch, opts.dtype)
        peer = transformers_images_per_s(model_dir, images, batch, opts.dtype)
        print(f"{batch:5d} | {ours:23.1f} | {peer:18.1f} | {ours / peer:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="a llava-hf checkpoint (default: the tiny random LLaVA of the tests)")
    parser.add_argument("--images", type=int, default=48, help="distinct images per measurement")
    parser.add_argument("--size", default="320x240", help="WxH of the PNG images sent (the processor resizes them)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lightserve-bench-") as scratch:
        model_dir = opts.model_dir
        if model_dir is None:
            from lightserve.utils.embedded_model import embedded_model_dir

            model_dir = str(build_tiny_llava(Path(scratch) / "llava", embedded_model_dir()))
        report(model_dir, opts)


if __name__ == "__main__":
    main()
