"""What the other processes need to know about a vision-language checkpoint's images, without
importing the vision tower: the accepted formats, the decoder, and the placeholder geometry.

The httpserver imports this module; importing `visual.encoder` there would pull transformers'
modelling code (about 4 s of start-up) into a process that never runs a model.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from PIL import Image

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Formats accepted from clients. PIL can open many more, some through external programs
# (EPS runs Ghostscript) or with a history of parser bugs; web images need only these.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class VisionSpec:
    """What the httpserver and the backend need to know about this model's images."""

    image_token_id: int  # the placeholder token an image tag in the prompt expands to
    tokens_per_image: int  # embedding rows (= placeholder tokens) per image
    hidden_size: int  # the language model's hidden size (embedding width)

    @classmethod
    def from_geometry(cls, image_token_id: int, image_size: int, patch_size: int, select_strategy: str,
                      hidden_size: int) -> "VisionSpec":
        side = image_size // patch_size
        # "default" drops the CLS position of the tower's output, "full" keeps it.
        extra = 1 if select_strategy == "full" else 0
        return cls(image_token_id, side * side + extra, hidden_size)

    @classmethod
    def from_config(cls, config: "PretrainedConfig") -> "VisionSpec":
        vision = config.vision_config
        return cls.from_geometry(config.image_token_id, vision.image_size, vision.patch_size,
                                 config.vision_feature_select_strategy, config.text_config.hidden_size)

    @classmethod
    def from_model_dir(cls, model_dir: Union[str, Path]) -> "VisionSpec":
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        if not isinstance(cfg.get("vision_config"), dict):
            raise ValueError(f"{model_dir} is not a vision-language model (config.json has no vision_config)")
        spelled_out = cls._from_config_json(cfg)
        if spelled_out is not None:
            return spelled_out
        # A config that leaves fields to transformers' defaults (llava-hf checkpoints often do).
        from transformers import AutoConfig  # imports torch, 1.5-2.5 s: only for such configs

        return cls.from_config(AutoConfig.from_pretrained(model_dir))

    @classmethod
    def _from_config_json(cls, cfg: dict) -> Optional["VisionSpec"]:
        """The spec from config.json alone, or None where it leaves a field to the defaults."""
        vision, text = cfg["vision_config"], cfg.get("text_config") or {}
        token = cfg.get("image_token_id", cfg.get("image_token_index"))
        fields = (token, vision.get("image_size"), vision.get("patch_size"),
                  cfg.get("vision_feature_select_strategy"), text.get("hidden_size"))
        return None if None in fields else cls.from_geometry(*fields)


def load_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (lazy PIL decoding would fail later, inside a batch)."""
    image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    image.load()
    return image
