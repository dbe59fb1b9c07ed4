"""The same workload through transformers' static batching, for the side-by-side ratio.

Method (what a plain transformers deployment does without a serving engine): the requests are cut
into FIFO batches of `batch_size` in workload order (no sorting by length); each batch is
left-padded to its longest prompt and generated greedily to its longest output
(min_new_tokens = max_new_tokens = that length, so no row stops early). Only each request's own
requested output tokens count as useful output; the rest of its row is waste that static batching
pays for. The result is a rate (useful output tokens / s), so it may be measured on the first K
requests of the workload and compared with a full run of the server.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, GenerationConfig

from lightserve.benchmark.workload import BenchRequest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFResult:
    model_dir: str
    dtype: str
    batch_size: int
    requests_run: int
    requests_total: int  # size of the whole workload; > requests_run when only a prefix was run
    batches: int
    duration_s: float
    useful_output_tokens: int  # sum of each request's own output length
    generated_tokens: int  # rows x steps actually computed, padding rows included
    useful_output_throughput: float

    @property
    def subset(self) -> bool:
        return self.requests_run < self.requests_total

    def to_json(self) -> dict:
        return {**asdict(self), "subset": self.subset}


def fifo_batches(requests: list[BenchRequest], batch_size: int) -> list[list[BenchRequest]]:
    """Consecutive slices of the workload, in order; the last one may be short."""
    return [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]


def left_pad(batch: list[BenchRequest], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, left-padded to the batch's longest prompt."""
    width = max(r.prompt_len for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, req in enumerate(batch):
        ids[row, width - req.prompt_len:] = torch.tensor(req.prompt_ids)
        mask[row, width - req.prompt_len:] = 1
    return ids, mask


def run_hf_baseline(model_dir: str, requests: list[BenchRequest], batch_size: int, dtype: str = "bfloat16",
                    max_requests: Optional[int] = None, progress: bool = True) -> HFResult:
    """Run the first `max_requests` (default all) requests through `generate` in static batches."""
    run = requests[:max_requests] if max_requests else requests
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval()
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    pad_id = 0 if pad_id is None else pad_id

    def generate(batch: list[BenchRequest], steps: int) -> torch.Tensor:
        ids, mask = left_pad(batch, pad_id)
        # A fresh config: the model's own may ask for sampling; both sides decode greedily.
        config = GenerationConfig(do_sample=False, max_new_tokens=steps, min_new_tokens=steps, pad_token_id=pad_id,
                                  eos_token_id=model.config.eos_token_id)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        if out.shape[1] - ids.shape[1] != steps:
            raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, expected {steps}")
        return out

    generate(run[:2], 2)  # warm-up: first calls pay one-off set-up costs
    batches = fifo_batches(run, batch_size)
    generated = 0
    start = time.perf_counter()
    for batch in tqdm(batches, desc="transformers", unit="batch", disable=not progress):
        steps = max(r.output_len for r in batch)
        generate(batch, steps)
        generated += len(batch) * steps
    duration = time.perf_counter() - start
    useful = sum(r.output_len for r in run)
    return HFResult(model_dir=str(model_dir), dtype=dtype, batch_size=batch_size, requests_run=len(run),
                    requests_total=len(requests), batches=len(batches), duration_s=duration,
                    useful_output_tokens=useful, generated_tokens=generated,
                    useful_output_throughput=useful / duration)
