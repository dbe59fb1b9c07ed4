"""LLaVA (llava-hf format): a Llama-family language model fed with image embeddings.

The vision tower and projector run in the visual server (`lightserve/visual/encoder.py`);
this class is the language model on the shared template, with two differences:

- tensor names: the language model is nested. Checkpoints on the Hub and those transformers 5
  writes with `save_pretrained` use "language_model.model." + "language_model.lm_head.";
  checkpoints saved from transformers' in-memory layout use "model.language_model." +
  "lm_head.". The prefix is found in the checkpoint rather than assumed.
- embedding: in prefill, the rows of image placeholders are overwritten with the image
  embeddings (`ForwardState.image_embeds` at `image_rows`, see `backend/image_inputs.py`).
"""

from __future__ import annotations

import torch

from lightserve.backend.forward_state import ForwardState
from lightserve.backend.models.template import CausalLM
from lightserve.backend.models.weights import CheckpointReader

# (language-model prefix, lm_head tensor) per checkpoint layout.
_LAYOUTS = (
    ("language_model.model.", "language_model.lm_head.weight"),
    ("model.language_model.", "lm_head.weight"),
)


class LlavaForConditionalGeneration(CausalLM):
    def load_weights(self, reader: CheckpointReader) -> None:
        for prefix, lm_head in _LAYOUTS:
            if prefix + "embed_tokens.weight" in reader:
                self.prefix, self.lm_head_name = prefix, lm_head
                break
        else:
            raise KeyError("no LLaVA language model in the checkpoint (looked for "
                           + ", ".join(p + "embed_tokens.weight" for p, _ in _LAYOUTS) + ")")
        super().load_weights(reader)

    def embed_tokens(self, input_ids: torch.Tensor, state: ForwardState) -> torch.Tensor:
        if state.image_rows is None:
            return super().embed_tokens(input_ids, state)
        # The placeholder id may lie outside the text vocabulary; its lookup is overwritten anyway.
        ids = input_ids.index_fill(0, state.image_rows, 0)
        hidden = super().embed_tokens(ids, state)
        return hidden.index_copy_(0, state.image_rows, self.linears.to_residual(state.image_embeds.to(hidden.dtype)))
