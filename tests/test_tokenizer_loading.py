"""`load_tokenizer` gives what AutoTokenizer gives, and the httpserver starts without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightserve.utils.tokenizer import GENERIC_TOKENIZER_MODEL_TYPES, load_tokenizer, loads_without_auto
from tests.model_factory import TOKENIZER_FILES

TEXTS = ["Hello, world!", "  two  spaces\nand a newline", "<|im_start|>user\nhi<|im_end|>", "naïve café 東京 🙂"]


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


def test_the_http_side_starts_without_torch(smollm2_dir):
    """The httpserver process loads the tokenizer and its app without importing torch (1-2.5 s of
    every start on two cores); only the model processes need it."""
    script = (
        "import sys\n"
        "from lightserve.utils.tokenizer import load_tokenizer\n"
        f"load_tokenizer({str(smollm2_dir)!r})\n"
        "import lightserve.launcher, lightserve.httpserver.app, lightserve.detokenization.manager\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-3000:]
