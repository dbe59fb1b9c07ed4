"""All configuration of a lightserve instance: one dataclass, filled from the command line."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, get_type_hints


@dataclass
class ServerArgs:
    model_dir: Optional[str] = field(default=None, metadata={"help": "model directory (default: the embedded SmolLM2-135M-Instruct)"})
    tokenizer_dir: Optional[str] = field(default=None, metadata={"help": "tokenizer directory (default: model_dir)"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP bind address"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    tp: int = field(default=1, metadata={"help": "tensor-parallel size (backend worker processes)"})
    data_type: str = field(default="auto", metadata={"help": "float32 | bfloat16 | float16 | auto (bf16 where fast, else fp32)"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto"})
    attention_backend: str = field(default="auto", metadata={"help": "auto | torch | cpu_native | triton"})
    quantization: str = field(default="none", metadata={"choices": ("none", "w8a8"), "help": "none | w8a8: int8 weights (per output channel, quantized at load) and int8 activations (per token) in every linear layer but the embedding and lm_head"})
    quantize_lm_head: bool = field(default=False, metadata={"help": "with --quantization w8a8: the lm_head too"})
    kv_cache_dtype: str = field(default="auto", metadata={"choices": ("auto", "int8"), "help": "auto (the model's dtype) | int8 (one fp32 scale per token and head; about twice the tokens in the same memory)"})
    max_total_token_num: Optional[int] = field(default=None, metadata={"help": "KV slots per rank (default: sized from --mem_fraction)"})
    mem_fraction: float = field(default=0.3, metadata={"help": "share of free memory the KV pool may take when sizing it"})
    max_req_total_len: int = field(default=2048, metadata={"help": "max prompt + generated tokens of one request"})
    batch_max_tokens: Optional[int] = field(default=None, metadata={"help": "max prompt tokens prefilled in one batch (default: max(max_req_total_len, 2048))"})
    chunked_prefill_size: int = field(default=256, metadata={"help": "tokens one step computes, decode rows and prompt chunks together; 0: a prompt is prefilled whole, in a step of its own"})
    disable_prefix_cache: bool = field(default=False, metadata={"help": "do not reuse the KV of prompt prefixes seen before (the prefix cache is on by default)"})
    running_max_req_size: int = field(default=256, metadata={"help": "max requests in the running batch"})
    max_waiting_reqs: int = field(default=1024, metadata={"help": "requests that may wait beyond the running batch; more get 429"})
    router_max_wait_tokens: int = field(default=6, metadata={"help": "decode steps between admissions while requests wait"})
    router_token_ratio: float = field(default=0.0, metadata={"help": "0: conservative admission; (0,1]: optimistic, may pause"})
    router_max_new_token_len: int = field(default=1024, metadata={"help": "cap on the estimate of tokens still to generate (optimistic mode)"})
    max_new_tokens_default: int = field(default=256, metadata={"help": "max_new_tokens when a request does not say"})
    enable_multimodal: bool = field(default=False, metadata={"help": "start the visual server and cache manager"})
    cache_capacity: int = field(default=200, metadata={"help": "image records kept by the cache manager"})
    visual_infer_batch_size: int = field(default=4, metadata={"help": "images encoded per visual batch"})
    max_images_per_request: int = field(default=4, metadata={"help": "images one request may carry (more: 422)"})
    max_image_bytes: int = field(default=10 * 2**20, metadata={"help": "largest encoded image, in bytes (larger: 422)"})
    max_image_pixels: int = field(default=25_000_000, metadata={"help": "largest image, width x height, read from its header before decoding (larger: 422)"})
    allow_remote_images: bool = field(default=False, metadata={"help": "fetch http(s) image URLs (off: only base64 / data: URIs; the server makes no outbound requests)"})
    nnodes: int = field(default=1, metadata={"help": "number of nodes"})
    node_rank: int = field(default=0, metadata={"help": "this node's rank"})
    dist_init_addr: Optional[str] = field(default=None, metadata={"help": "host:port of torch.distributed rendezvous (multi-node)"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body accepted, in bytes (larger: 413)"})
    api_key: Optional[str] = field(default=None, metadata={"help": "require `Authorization: Bearer KEY` on every route but /health"})
    graceful_shutdown_s: float = field(default=5.0, metadata={"help": "after SIGTERM/SIGINT, seconds the requests in flight get to finish; those still running then end with an error"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})
    log_stats_interval: float = field(default=10.0, metadata={"help": "seconds between the router's throughput/load log lines while busy (0: off)"})
    seed: int = field(default=0, metadata={"help": "seed for weights-independent randomness (request seeds are per request)"})

    def ranks_of_node(self) -> range:
        """The tensor-parallel ranks that run on this node."""
        if self.tp % self.nnodes:
            raise ValueError(f"--tp {self.tp} is not divisible by --nnodes {self.nnodes}")
        per_node = self.tp // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    def resolved_batch_max_tokens(self) -> int:
        return self.batch_max_tokens or max(self.max_req_total_len, 2048)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            helptext = f.metadata.get("help", "")
            if kind is bool:
                parser.add_argument(f"--{f.name}", action="store_true", help=helptext)
                continue
            base = kind
            if getattr(kind, "__args__", None):  # Optional[X]
                base = next(a for a in kind.__args__ if a is not type(None))
            parser.add_argument(f"--{f.name}", type=base, default=f.default, choices=f.metadata.get("choices"),
                                help=f"{helptext} (default: {f.default})")

    @classmethod
    def from_cli(cls, argv: Optional[list[str]] = None) -> "ServerArgs":
        parser = argparse.ArgumentParser(prog="python -m lightserve.api_server", description="lightserve LLM server")
        cls.add_cli_args(parser)
        ns = parser.parse_args(argv)
        return cls(**vars(ns))
