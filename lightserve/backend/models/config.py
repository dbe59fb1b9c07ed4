"""Model hyper-parameters read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass
class ModelConfig:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None
    # The whole config.json, for families that need more (e.g. LLaVA's vision tower).
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], architecture: Optional[str] = None,
                  raw: Optional[dict[str, Any]] = None) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        architecture = architecture or (archs[0] if archs else "")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers >= 5 keeps rope settings in `rope_parameters`; older configs use
        # `rope_theta` + `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=architecture,
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            raw=cfg if raw is None else raw,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "ModelConfig":
        with open(Path(model_dir) / "config.json") as f:
            cfg = json.load(f)
        if "text_config" in cfg:
            # LLaVA: the backend runs the language model; the vision settings stay in `raw`.
            text = {**language_model_config(cfg["text_config"]), "architectures": cfg.get("architectures")}
            return cls.from_dict(text, raw=cfg)
        return cls.from_dict(cfg)


# What `ModelConfig.from_dict` reads and a family's config class may fill with a default of its own.
LANGUAGE_MODEL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                         "tie_word_embeddings", "bos_token_id", "eos_token_id")


def language_model_config(text_config: dict[str, Any]) -> dict[str, Any]:
    """A vision-language config's nested `text_config` with every field filled in.

    llava-hf checkpoints often store only the fields that differ from the language model's
    defaults (llava-1.5-7b-hf lists no hidden size at all), so the missing ones come from
    transformers' config class of that `model_type`, built from the given fields (derived
    values such as head_dim then follow the given hidden size, not a default one). A config that
    spells every field out is taken as it is: importing transformers' config classes costs 2-3 s
    of CPU at start-up.
    """
    has_rope = any(k in text_config for k in ("rope_parameters", "rope_theta"))
    if has_rope and all(k in text_config for k in LANGUAGE_MODEL_FIELDS):
        return dict(text_config)
    return filled_language_model_config(text_config)


def filled_language_model_config(text_config: dict[str, Any]) -> dict[str, Any]:
    """`text_config` completed by transformers' config class of its model type."""
    from transformers import CONFIG_MAPPING

    fields = {k: v for k, v in text_config.items() if k != "model_type"}
    full = CONFIG_MAPPING[text_config.get("model_type", "llama")](**fields).to_dict()
    return {**full, **fields}
