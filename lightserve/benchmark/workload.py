"""The benchmark workload: requests with exact prompt lengths (in the server's tokens) and output lengths.

Prompt construction. A prompt of length n must tokenize to exactly n tokens on the server, which
encodes `inputs` with the model's tokenizer including the special tokens it adds (a BOS for some
tokenizers). Random token ids do not survive decode -> encode (neighbouring pieces merge or split),
so prompts are drawn from a pool of whole-word tokens (byte-level BPE `Ġword` or SentencePiece
`▁word`, lower-case letters only). Words separated by spaces are split apart by the
pre-tokenizer, so such a sequence round-trips token for token (with SmolLM2's tokenizer the
first draw was exact for 90 of 90 prompts of 32-512 tokens). Each prompt is re-tokenized to check; if the length is off (an unusual tokenizer
or vocabulary), the re-tokenized ids are trimmed or extended with more words and the check is
repeated until the length is exact, or an error is raised. The final `prompt_ids` are the
tokenizer's own encoding of the text, i.e. exactly what the server will see.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

# Whole-word vocabulary entries: a word-start marker (byte-level BPE or SentencePiece), then letters.
_WORD_TOKEN = re.compile(r"^[\u0120\u2581][a-z]{2,}$")
_MAX_REPAIRS = 10


@dataclass(frozen=True)
class LengthSpec:
    """How a length is drawn: `N` (fixed), `LO:HI` (uniform integers, inclusive) or
    `LO:HI:normal` (normal around the midpoint, sigma = range/6, clipped to [LO, HI])."""

    lo: int
    hi: int
    dist: str = "uniform"

    @classmethod
    def parse(cls, text: str) -> "LengthSpec":
        parts = text.split(":")
        try:
            if len(parts) == 1:
                spec = cls(int(parts[0]), int(parts[0]))
            elif len(parts) in (2, 3):
                spec = cls(int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "uniform")
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"length spec {text!r}: expected N, LO:HI or LO:HI:normal") from None
        if not 1 <= spec.lo <= spec.hi:
            raise ValueError(f"length spec {text!r}: need 1 <= LO <= HI")
        if spec.dist not in ("uniform", "normal"):
            raise ValueError(f"length spec {text!r}: distribution must be uniform or normal")
        return spec

    def sample(self, rng: random.Random) -> int:
        if self.dist == "normal" and self.hi > self.lo:
            value = round(rng.gauss((self.lo + self.hi) / 2, (self.hi - self.lo) / 6))
            return min(self.hi, max(self.lo, value))
        return rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        if self.lo == self.hi:
            return str(self.lo)
        return f"{self.lo}:{self.hi}" + ("" if self.dist == "uniform" else f":{self.dist}")


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload. `prompt_ids` is the tokenizer's encoding of `prompt` with its
    special tokens, as the server computes it; `output_len` is the requested `max_new_tokens`."""

    prompt: str
    prompt_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


class PromptBuilder:
    """Builds texts that the tokenizer encodes to an exact number of tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        # Tokens the tokenizer adds around any text (e.g. BOS); they count toward the prompt length.
        self.special_overhead = len(tokenizer.encode("a")) - len(tokenizer.encode("a", add_special_tokens=False))
        self.pool = self._word_pool(tokenizer)
        if len(self.pool) < 100:
            raise ValueError(f"tokenizer has only {len(self.pool)} whole-word tokens; cannot build prompts")

    @staticmethod
    def _word_pool(tokenizer: PreTrainedTokenizerBase) -> list[int]:
        ids = list(range(len(tokenizer)))
        special = set(tokenizer.all_special_ids)
        # The vocabulary pieces are read directly (no per-token decode/encode: ~1 s for a 50k
        # vocabulary); whether a prompt of them round-trips is checked on the prompt in `build`.
        return [i for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids))
                if i not in special and piece is not None and _WORD_TOKEN.match(piece)]

    def build(self, length: int, rng: random.Random) -> tuple[str, list[int]]:
        """A text of exactly `length` tokens (special tokens included) and its token ids."""
        body = length - self.special_overhead
        if body < 1:
            raise ValueError(f"prompt length {length} leaves no room beside {self.special_overhead} special tokens")
        ids = [rng.choice(self.pool) for _ in range(body)]
        for _ in range(_MAX_REPAIRS):
            text = self.tokenizer.decode(ids)
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == body:
                full = self.tokenizer.encode(text)
                if len(full) == length:
                    return text, full
            # Re-tokenize and trim (or extend) the ids, then check again.
            ids = encoded[:body] + [rng.choice(self.pool) for _ in range(body - len(encoded))]
        raise RuntimeError(f"could not build a prompt of exactly {length} tokens with this tokenizer")


def synthetic_workload(tokenizer: PreTrainedTokenizerBase, num_requests: int, prompt_len: LengthSpec,
                       output_len: LengthSpec, seed: int) -> list[BenchRequest]:
    """`num_requests` requests with seeded random prompt and output lengths and random word prompts.

    All lengths are drawn before any prompt text, so the lengths depend on the seed only (not on
    the tokenizer)."""
    rng = random.Random(seed)
    lengths = [(prompt_len.sample(rng), output_len.sample(rng)) for _ in range(num_requests)]
    builder = PromptBuilder(tokenizer)
    requests = []
    for p_len, o_len in lengths:
        text, ids = builder.build(p_len, rng)
        requests.append(BenchRequest(text, tuple(ids), o_len))
    return requests


def load_jsonl(path: str | Path, tokenizer: PreTrainedTokenizerBase, output_len: LengthSpec, seed: int,
               limit: Optional[int] = None) -> list[BenchRequest]:
    """Requests from a JSONL file, one object a line: `{"prompt": str}` (or `"inputs"` / `"text"`)
    and optionally `"output_len"` (or `"max_new_tokens"`); missing output lengths are drawn from
    `output_len` with `seed`. Lines are taken in file order, the first `limit` of them."""
    rng = random.Random(seed)
    requests = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            record = json.loads(line)
            prompt = _first_key(record, ("prompt", "inputs", "text"), path, number)
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{number}: the prompt must be a non-empty string")
            out = record.get("output_len", record.get("max_new_tokens"))
            out = output_len.sample(rng) if out is None else int(out)
            if out < 1:
                raise ValueError(f"{path}:{number}: output length must be >= 1")
            requests.append(BenchRequest(prompt, tuple(tokenizer.encode(prompt)), out))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def _first_key(record: dict, keys: Sequence[str], path: str | Path, number: int) -> object:
    for key in keys:
        if key in record:
            return record[key]
    raise ValueError(f"{path}:{number}: no prompt (expected one of {', '.join(keys)})")
