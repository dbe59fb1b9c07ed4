"""What the other processes need to know about a vision-language checkpoint's images, without
importing the vision tower: the accepted formats, the decoder, and the placeholder geometry.

The httpserver imports this module; importing `visual.encoder` there would pull transformers'
modelling code (about 4 s of start-up) into a process that never runs a model.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

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
    def from_config(cls, config: "PretrainedConfig") -> "VisionSpec":
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        # "default" drops the CLS position of the tower's output, "full" keeps it.
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
        return cls(config.image_token_id, side * side + extra, config.text_config.hidden_size)

    @classmethod
    def from_model_dir(cls, model_dir: Union[str, Path]) -> "VisionSpec":
        from transformers import AutoConfig  # imports torch: only multimodal servers pay for it

        config = AutoConfig.from_pretrained(model_dir)
        if getattr(config, "vision_config", None) is None:
            raise ValueError(f"{model_dir} is not a vision-language model (config.json has no vision_config)")
        return cls.from_config(config)


def load_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (lazy PIL decoding would fail later, inside a batch)."""
    image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    image.load()
    return image
