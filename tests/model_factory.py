"""Tiny random-weight checkpoints in Hugging Face format, built locally for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    vocab_size=320,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    # Llama with GQA, llama3 rope scaling and untied embeddings.
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
    ),
    # Llama with tied embeddings and one KV head per query-head group of 4 (like SmolLM2's 3:1).
    "llama_tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
}


def build_tiny_model(family: str, out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-weight model of `family` to `out_dir` (safetensors + config.json)."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**TINY_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Larger-than-default weights so logits differ clearly between tokens (init std 0.02 gives
    # near-uniform distributions that hide bugs).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif "bias" in str(p.shape):
                p.normal_(0.0, 0.05)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_tiny_model_with_tokenizer(family: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random model whose vocabulary is that of a real tokenizer, so it can be served
    over HTTP with text prompts (the tokenizer files are copied beside the weights)."""
    import shutil

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    build_tiny_model(family, out_dir, seed=seed, vocab_size=len(tokenizer),
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).exists():
            shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir
