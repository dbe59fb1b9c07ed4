from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two cores here; tests that spawn processes set their own thread counts.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint per supported family, built once per test session."""
    from tests.model_factory import build_tiny_model  # imports transformers' models: 4 s

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in ("llama", "llama_tied", "mistral", "qwen2")}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, converted once into the lightserve cache."""
    from lightserve.utils.embedded_model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    """transformers' SmolLM2 in fp32: the reference of the token-exact tests (loaded once)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_served_model(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer: fast to serve, real text in and out."""
    from tests.model_factory import build_tiny_model_with_tokenizer

    return build_tiny_model_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_served") / "llama", smollm2_dir)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random-weight LLaVA (CLIP tower, projector, SmolLM2-shaped language model)."""
    from tests.llava_factory import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "llava", smollm2_dir)


@pytest.fixture(scope="session")
def hf_llava(llava_dir):
    """transformers' LlavaForConditionalGeneration and processor on `llava_dir`, fp32."""
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32).eval()
    return model, transformers.AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="session")
def tiny_server(tiny_served_model):
    """The tiny model served with TINY_SERVER_FLAGS, shared by every module that needs no other flags
    (tests take deltas of counters and wait for an idle pool, never a fresh server's state)."""
    from tests.server_harness import TINY_SERVER_FLAGS, ServerProcess

    with ServerProcess(tiny_served_model, *TINY_SERVER_FLAGS) as server:
        yield server


@pytest.fixture(scope="session")
def smol_server(smollm2_dir):
    """The embedded SmolLM2 served in fp32 with SMOL_SERVER_FLAGS, for token-exact answers over HTTP."""
    from tests.server_harness import SMOL_SERVER_FLAGS, ServerProcess

    with ServerProcess(smollm2_dir, *SMOL_SERVER_FLAGS) as server:
        yield server
