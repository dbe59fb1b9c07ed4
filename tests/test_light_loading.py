"""What start-up reads without transformers' heavy paths equals what those paths give: the
tokenizer (`load_tokenizer` against AutoTokenizer), LLaVA's language-model config and image
geometry (config.json against transformers' config classes). The httpserver starts without torch."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from lightserve.backend.models.config import ModelConfig, filled_language_model_config
from lightserve.utils.tokenizer import GENERIC_TOKENIZER_MODEL_TYPES, load_tokenizer, loads_without_auto
from lightserve.visual.spec import VisionSpec
from tests.model_factory import TOKENIZER_FILES

TEXTS = ["Hello, world!", "  two  spaces\nand a newline", "<|im_start|>user\nhi<|im_end|>", "na\u00efve caf\u00e9 \u6771\u4eac \U0001f642"]  # accents, CJK, an emoji


def _checkpoint(tmp_path: Path, smollm2_dir: Path, model_type: str) -> Path:
    """SmolLM2's tokenizer files beside a config.json of the given model type."""
    d = tmp_path / model_type
    d.mkdir()
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, d / name)
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


@pytest.mark.parametrize("model_type", GENERIC_TOKENIZER_MODEL_TYPES)
def test_generic_tokenizers_load_directly_and_equal_auto_tokenizers(tmp_path, smollm2_dir, model_type: str):
    d = _checkpoint(tmp_path, smollm2_dir, model_type)
    assert loads_without_auto(d)
    ours, auto = load_tokenizer(d), AutoTokenizer.from_pretrained(d)
    assert type(ours) is type(auto)
    for text in TEXTS:
        ids = auto(text)["input_ids"]
        assert ours(text)["input_ids"] == ids
        assert ours.decode(ids) == auto.decode(ids)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert ours.all_special_ids == auto.all_special_ids and ours.eos_token_id == auto.eos_token_id


def test_remapped_model_types_and_named_classes_go_through_auto_tokenizer(tmp_path, smollm2_dir):
    # transformers maps a Qwen2 checkpoint to its own tokenizer class whatever tokenizer_config says.
    qwen = _checkpoint(tmp_path, smollm2_dir, "qwen2")
    assert not loads_without_auto(qwen)
    assert type(load_tokenizer(qwen)).__name__ == "Qwen2Tokenizer"
    named = _checkpoint(tmp_path, smollm2_dir, "llama")
    config = json.loads((named / "tokenizer_config.json").read_text())
    (named / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert not loads_without_auto(named)
    assert type(load_tokenizer(named)).__name__ == "GPT2Tokenizer"


def test_the_http_side_starts_without_torch(smollm2_dir, llava_dir):
    """The httpserver process loads the tokenizer, a LLaVA checkpoint's image geometry and its app
    without importing torch (1-2.5 s of every start on two cores); only the model processes need it."""
    script = (
        "import sys\n"
        "from lightserve.visual.spec import VisionSpec\n"
        f"VisionSpec.from_model_dir({str(llava_dir)!r})\n"
        "from lightserve.utils.tokenizer import load_tokenizer\n"
        f"load_tokenizer({str(smollm2_dir)!r})\n"
        "import lightserve.launcher, lightserve.httpserver.app, lightserve.detokenization.manager\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-3000:]


def test_a_spelled_out_llava_config_reads_as_transformers_fills_it(llava_dir, tmp_path):
    cfg = json.loads((llava_dir / "config.json").read_text())
    text = cfg["text_config"]
    filled, as_is = ModelConfig.from_dict(filled_language_model_config(text)), ModelConfig.from_dict(dict(text))
    assert dataclasses.replace(filled, raw={}) == dataclasses.replace(as_is, raw={})
    assert VisionSpec.from_model_dir(llava_dir) == VisionSpec.from_config(AutoConfig.from_pretrained(llava_dir))
    # Leave out what transformers' defaults then supply: both readers take the slow path and agree.
    del cfg["vision_config"]["image_size"], cfg["text_config"]["rms_norm_eps"]
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    (sparse / "config.json").write_text(json.dumps(cfg))
    assert VisionSpec.from_model_dir(sparse) == VisionSpec.from_config(AutoConfig.from_pretrained(sparse))
    assert ModelConfig.from_model_dir(sparse).rms_norm_eps == 1e-6  # LlamaConfig's default
