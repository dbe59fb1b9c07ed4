"""The vision side of a LLaVA checkpoint: image processor, vision tower and projector.

Images go through the model's own image processor (transformers' `AutoImageProcessor`, the
resize / crop / normalise the model was trained with), the vision tower (transformers'
implementation, built from `vision_config`), feature selection (`vision_feature_layer`,
`vision_feature_select_strategy`) and the two-layer projector into the language model's hidden
size. Only the vision tensors of the checkpoint are read; the language model stays with the
backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.activations import ACT2FN

from lightserve.backend.models.weights import CheckpointReader
from lightserve.visual.spec import VisionSpec

# Every ViT-style tower (CLIP, SigLIP) has this tensor; its name locates the tower in the checkpoint.
_TOWER_ANCHOR = "embeddings.patch_embedding.weight"
_PROJECTOR_ANCHOR = "multi_modal_projector.linear_1.weight"


def _prefix_of(reader: CheckpointReader, anchor: str) -> str:
    names = [n for n in reader.names() if n.endswith(anchor)]
    if len(names) != 1:
        raise ValueError(f"expected one checkpoint tensor ending in {anchor!r}, found {names}")
    return names[0][: -len(anchor)]


class VisionEncoder:
    """Images -> embeddings [B, tokens_per_image, hidden] (float32) for one LLaVA checkpoint."""

    def __init__(self, model_dir: Union[str, Path], dtype: torch.dtype, device: torch.device):
        self.config = AutoConfig.from_pretrained(model_dir)
        self.spec = VisionSpec.from_config(self.config)
        self.dtype = dtype
        self.device = device
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        reader = CheckpointReader(model_dir)
        self.tower = AutoModel.from_config(self.config.vision_config)
        self._load_tower(reader)
        self.tower.to(device=device, dtype=dtype).eval()
        p = _prefix_of(reader, _PROJECTOR_ANCHOR) + "multi_modal_projector."

        def load(name: str):
            t = reader.get_optional(p + name)
            return None if t is None else t.to(device=device, dtype=dtype)

        self.w1, self.b1, self.w2, self.b2 = load("linear_1.weight"), load("linear_1.bias"), load("linear_2.weight"), load("linear_2.bias")
        self.act = ACT2FN[self.config.projector_hidden_act]

    def _load_tower(self, reader: CheckpointReader) -> None:
        # Checkpoints name the tower "vision_tower.vision_model." (llava-hf on the Hub),
        # "vision_tower." or "model.vision_tower." (transformers 5); the module's own names may
        # carry a "vision_model." level too. Map one onto the other through a shared anchor.
        ckpt = _prefix_of(reader, _TOWER_ANCHOR)
        own_names = list(self.tower.state_dict())
        own = next(n for n in own_names if n.endswith(_TOWER_ANCHOR))[: -len(_TOWER_ANCHOR)]
        state = {own + n[len(ckpt):]: reader.get(n) for n in reader.names() if n.startswith(ckpt)}
        self.tower.load_state_dict(state, strict=True)

    @torch.inference_mode()
    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = self.tower(pixels.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        layers = self.config.vision_feature_layer
        chosen = [hidden[layers]] if isinstance(layers, int) else [hidden[i] for i in layers]
        if self.config.vision_feature_select_strategy == "default":
            chosen = [h[:, 1:] for h in chosen]
        feats = torch.cat(chosen, dim=-1)
        out = F.linear(self.act(F.linear(feats, self.w1, self.b1)), self.w2, self.b2).float()
        if out.shape[1] != self.spec.tokens_per_image:
            raise ValueError(f"the vision tower gave {out.shape[1]} positions per image, "
                             f"expected {self.spec.tokens_per_image} (image processor and vision_config disagree)")
        return out
