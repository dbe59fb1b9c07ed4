"""Model registry keyed by the `architectures` entry of config.json (a dict, not an if-chain)."""

from __future__ import annotations

from lightserve.backend.models.families import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from lightserve.backend.models.llava import LlavaForConditionalGeneration
from lightserve.backend.models.template import CausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    # The language model only: the vision tower and projector run in the visual server.
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
}


def model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: {supported}") from None
