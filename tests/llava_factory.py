"""A tiny random-weight LLaVA in llava-hf format, and its language model run through lightserve.

CLIP vision tower on 40x40 images with 8x8 patches (25 image tokens), a two-layer Llama
language model, and SmolLM2's real tokenizer with an added `<image>` special token; the
processor (CLIP image processor + tokenizer + LLaVA settings) is saved beside the weights, as
on the Hub. `LlavaRunner` runs the language model through lightserve's model class and the
backend's image-embedding reader, as the engine's prefill does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from lightserve.backend.attention import make_attention
from lightserve.backend.forward_state import ForwardState
from lightserve.backend.image_inputs import ChunkImages, gather_image_embeds
from lightserve.backend.mem_manager import LayerKV
from lightserve.backend.models.config import ModelConfig
from lightserve.backend.models.llava import LlavaForConditionalGeneration
from lightserve.backend.parallel import SINGLE, TensorParallel
from lightserve.io_struct import GenerateReq

IMAGE_SIZE = 40
PATCH_SIZE = 8
IMAGE_TOKEN = "<image>"
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2


def build_tiny_llava(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        # Even, so the vocabulary splits at tp=2 (the added <image> token made it odd).
        vocab_size=len(tokenizer) + len(tokenizer) % 2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                      image_seq_length=TOKENS_PER_IMAGE)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    # Larger-than-default weights, so images and tokens move the logits clearly (init std 0.02
    # gives near-uniform distributions that hide bugs).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def random_image(seed: int, width: int, height: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """Encoded noise with smooth gradients (so resizing does not average everything away)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0, 6) + y * rng.uniform(0, 6)) % 256 for _ in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def hf_generate(hf, prompt: str, images: list[bytes], steps: int) -> tuple[list[int], list[int]]:
    """(expanded prompt ids, greedy generated ids) from transformers; `hf` is (model, processor)."""
    model, processor = hf
    pil = [Image.open(io.BytesIO(b)) for b in images]
    inputs = processor(images=pil, text=prompt, return_tensors="pt")
    eos = model.config.text_config.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


# ---- running the language model through lightserve ------------------------------------------

def text_model_config(model_dir: Path) -> ModelConfig:
    """The language model's hyper-parameters, nested under `text_config` in a LLaVA config."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return ModelConfig.from_dict({**raw["text_config"], "architectures": raw["architectures"]})


class LlavaRunner:
    """lightserve's LLaVA model over packed prefills (as the engine runs it), greedy.

    Each step re-runs the prefill of every request's whole sequence, so image splicing is
    exercised at every step; decode steps carry no images and are covered by the engine tests.
    """

    def __init__(self, model_dir: Path, tp: TensorParallel = SINGLE, max_tokens: int = 1024):
        self.cfg = text_model_config(model_dir)
        split = tp.head_split(self.cfg.num_heads, self.cfg.num_kv_heads)
        attention = make_attention("torch", split.num_q, split.num_kv, self.cfg.head_dim)
        self.model = LlavaForConditionalGeneration(str(model_dir), self.cfg, tp, torch.float32, torch.device("cpu"), attention)
        shape = (max_tokens, split.num_kv, self.cfg.head_dim)
        self.kv = [LayerKV(torch.zeros(shape), torch.zeros(shape)) for _ in range(self.cfg.num_layers)]

    def last_logits(self, reqs: list[GenerateReq], prefix: str) -> torch.Tensor:
        inputs = [r.prompt_ids + r.output_ids for r in reqs]
        lens = torch.tensor([len(x) for x in inputs])
        ends = lens.cumsum(0)
        starts = ends - lens
        positions = torch.arange(int(ends[-1])) - starts.repeat_interleave(lens)
        state = ForwardState(
            positions=positions, out_slots=torch.arange(int(ends[-1])),
            b_req_idx=torch.arange(len(reqs), dtype=torch.int32), b_seq_len=lens.to(torch.int32),
            req_to_token=torch.zeros(1, 1, dtype=torch.int32), num_decode=0, max_seq_len=int(lens.max()),
            b_start=starts.tolist(), b_new_len=lens.tolist(), b_prefix_len=[0] * len(reqs),
        )
        chunks = [ChunkImages(r.req_id, r.images, 0, n, start) for r, n, start in zip(reqs, lens.tolist(), starts.tolist())]
        state.image_embeds, state.image_rows = gather_image_embeds(chunks, prefix, self.cfg.hidden_size, torch.float32,
                                                                   torch.device("cpu"))
        ids = torch.tensor([t for x in inputs for t in x])
        with torch.no_grad():
            return self.model.forward(ids, state, self.kv, ends - 1)

    def greedy(self, reqs: list[GenerateReq], prefix: str, steps: int) -> list[list[int]]:
        reqs = [GenerateReq(r.req_id, r.prompt_ids, r.sampling, images=r.images) for r in reqs]
        live = list(reqs)
        for _ in range(steps):
            nxt = self.last_logits(live, prefix).argmax(-1).tolist()
            for r, t in zip(live, nxt):
                r.output_ids.append(t)
            live = [r for r in live if r.output_ids[-1] not in self.cfg.eos_token_ids]
            if not live:
                break
        return [r.output_ids for r in reqs]


def tp_rank_last_logits(rank: int, port: int, model_dir: str, reqs: list[GenerateReq], prefix: str, results) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    logits = LlavaRunner(Path(model_dir), TensorParallel(rank, 2)).last_logits(reqs, prefix)
    if rank == 0:
        results.put(logits.numpy())
    torch.distributed.destroy_process_group()
