"""Model families on the shared template. Each overrides only what differs from Llama."""

from __future__ import annotations

from lightserve.backend.models.template import CausalLM


class LlamaForCausalLM(CausalLM):
    """Llama 2/3 (incl. llama3 rope scaling), SmolLM2, tied or untied embeddings."""


class MistralForCausalLM(CausalLM):
    """Same layer as Llama. Sliding-window attention is not applied: contexts are bounded by
    --max_req_total_len, which the server keeps within the window."""


class Qwen2ForCausalLM(CausalLM):
    """Llama layer with q/k/v biases; LayerWeights loads biases whenever the checkpoint has them."""
