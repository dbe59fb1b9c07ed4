"""Loading a model's tokenizer without importing torch where transformers would not need it.

`AutoTokenizer.from_pretrained` reads the model's config through `AutoConfig`, whose module
imports torch: 1.5-2.5 s of CPU in processes that only tokenize (the httpserver, the
detokenizer), on every server start. When the checkpoint's `tokenizer_config.json` names the
generic fast tokenizer and the model type maps to no tokenizer class of its own, AutoTokenizer
ends up building that generic class from `tokenizer.json`; this module builds it directly.
Any other checkpoint goes through AutoTokenizer, unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# tokenizer_config.json names under which transformers (v5) means its generic tokenizers-library
# tokenizer; `PreTrainedTokenizerFast` is an alias of `TokenizersBackend` there.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
# Model types for which AutoTokenizer keeps a generic tokenizer_class as it is (no registered
# class of their own, or the generic one; tests/test_tokenizer_loading.py holds this against the
# installed transformers). Qwen2, for one, is remapped to Qwen2Tokenizer and is not listed.
GENERIC_TOKENIZER_MODEL_TYPES = ("llama", "mistral", "llava")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def loads_without_auto(tokenizer_dir: str | Path) -> bool:
    """Whether AutoTokenizer would build the generic fast tokenizer from tokenizer.json here."""
    d = Path(tokenizer_dir)
    if not (d / "tokenizer.json").exists():
        return False
    tokenizer_config = _read_json(d / "tokenizer_config.json")
    model_type = _read_json(d / "config.json").get("model_type")
    return (tokenizer_config.get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES
            and "auto_map" not in tokenizer_config
            and model_type in GENERIC_TOKENIZER_MODEL_TYPES)


def load_tokenizer(tokenizer_dir: str | Path):
    """The tokenizer AutoTokenizer would load from `tokenizer_dir`, without torch where possible."""
    if loads_without_auto(tokenizer_dir):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
