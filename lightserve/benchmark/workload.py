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

Workloads for a prefix cache (`WorkloadShape`):
- Shared prefixes: every prompt is one of G prefixes of exactly N tokens (special tokens included)
  followed by its own suffix. The suffix words are drawn after the prefix's ids and the whole text
  is checked and repaired as above, with the prefix's ids held fixed, so all prompts of a group
  share exactly the same first N token ids on the server.
- Multi-turn chat: a conversation's turn k prompt is turn k-1's prompt + the server's answer to it
  + a new user message (`next_turn_prompt`). Only the first turn and the user messages are known
  before the run; later prompts are made by the load generator from the answers it receives.
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
        self.special_ids = set(tokenizer.all_special_ids)
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

    def build(self, length: int, rng: random.Random, prefix_ids: Sequence[int] = ()) -> tuple[str, list[int]]:
        """A text of exactly `length` tokens (special tokens included) and its token ids.

        With `prefix_ids` (the ids of an earlier `build`), the ids start with exactly those: only
        the words after the prefix are drawn and repaired, so prompts built on one prefix share
        their first `len(prefix_ids)` tokens."""
        head = [i for i in prefix_ids if i not in self.special_ids]
        body = length - self.special_overhead
        drawn = body - len(head)
        if drawn < 1:
            raise ValueError(f"prompt length {length} leaves no room beside {self.special_overhead} special tokens"
                             f" and a prefix of {len(prefix_ids)} tokens")
        tail = self._draw(drawn, rng)
        for _ in range(_MAX_REPAIRS):
            text = self.tokenizer.decode(head + tail)
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
            if encoded[:len(head)] != head:
                # The first drawn word merged with the prefix's last one: draw the words again.
                tail = self._draw(drawn, rng)
                continue
            if len(encoded) == body:
                full = self.tokenizer.encode(text)
                if len(full) == length and full[:len(prefix_ids)] == list(prefix_ids):
                    return text, full
            # Re-tokenize and trim (or extend) the drawn words, then check again.
            tail = encoded[len(head):body] + self._draw(body - len(encoded), rng)
        raise RuntimeError(f"could not build a prompt of exactly {length} tokens with this tokenizer"
                           + (" on a shared prefix (special tokens after the text?)" if prefix_ids else ""))

    def text(self, length: int, rng: random.Random) -> str:
        """A text of exactly `length` tokens without the tokenizer's special tokens: a message that
        goes inside a prompt, after other text."""
        return self.build(length + self.special_overhead, rng)[0]

    def _draw(self, count: int, rng: random.Random) -> list[int]:
        return [rng.choice(self.pool) for _ in range(count)]


@dataclass(frozen=True)
class WorkloadShape:
    """How the synthetic prompts relate to each other (what a prefix cache can reuse); reported
    with the results so that a run says what it measured.

    - `shared_prefix_len`: every prompt starts with one of `shared_prefix_groups` prefixes of exactly
      this many tokens (special tokens included); request i (conversation i in multi-turn) takes
      prefix i mod groups (round-robin: equal groups, interleaved in arrival order). 0: none.
    - `multi_turn`: turns per conversation; 0: independent requests (as one-turn conversations)."""

    shared_prefix_len: int = 0
    shared_prefix_groups: int = 1
    multi_turn: int = 0

    @property
    def turns(self) -> int:
        return max(self.multi_turn, 1)


@dataclass(frozen=True)
class FollowUp:
    """A later turn of a conversation: the user message it adds and its max_new_tokens."""

    user_message: str
    output_len: int


@dataclass(frozen=True)
class Conversation:
    """Turns sent one after another. The first turn is a complete request; a later turn's prompt
    contains the server's earlier answers, so the load generator makes it during the run
    (`next_turn_prompt`) from its `FollowUp`."""

    first: BenchRequest
    follow_ups: tuple[FollowUp, ...] = ()

    @property
    def turns(self) -> int:
        return 1 + len(self.follow_ups)

    @property
    def output_lens(self) -> list[int]:
        return [self.first.output_len] + [f.output_len for f in self.follow_ups]


def next_turn_prompt(previous_prompt: str, answer: str, user_message: str) -> str:
    """Turn k's prompt: turn k-1's prompt, the text the server generated for it, then the new user
    message, concatenated as they are (no chat template), so each prompt extends the previous one
    as text. Its tokens may differ from the previous ids + answer ids where the pieces meet."""
    return previous_prompt + answer + user_message


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[int]:
    """Token counts of `prompts` as the server encodes them (special tokens included)."""
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]]


def synthetic_workload(tokenizer: PreTrainedTokenizerBase, num_requests: int, prompt_len: LengthSpec,
                       output_len: LengthSpec, seed: int, shared_prefix_len: int = 0,
                       shared_prefix_groups: int = 1) -> list[BenchRequest]:
    """`num_requests` requests with seeded random prompt and output lengths and random word prompts;
    with `shared_prefix_len`, each prompt is a shared prefix + a suffix of `prompt_len` tokens
    (see `WorkloadShape`)."""
    shape = WorkloadShape(shared_prefix_len, shared_prefix_groups)
    return [c.first for c in conversation_workload(tokenizer, num_requests, prompt_len, output_len, seed, shape)]


def conversation_workload(tokenizer: PreTrainedTokenizerBase, num_conversations: int, prompt_len: LengthSpec,
                          output_len: LengthSpec, seed: int, shape: WorkloadShape) -> list[Conversation]:
    """`num_conversations` conversations of `shape.turns` turns. Each turn's user message has a
    length drawn from `prompt_len` (the first one's counts the special tokens and follows the
    shared prefix, if any) and each turn an output length from `output_len`.

    All lengths are drawn before any prompt text, so the lengths depend on the seed only (not on
    the tokenizer), and one-turn conversations without a shared prefix are the same requests as
    before multi-turn and shared prefixes existed."""
    rng = random.Random(seed)
    turns = shape.turns
    lengths = [(prompt_len.sample(rng), output_len.sample(rng)) for _ in range(num_conversations * turns)]
    builder = PromptBuilder(tokenizer)
    prefixes: list[Sequence[int]] = [()]
    if shape.shared_prefix_len:
        prefixes = [builder.build(shape.shared_prefix_len, rng)[1] for _ in range(shape.shared_prefix_groups)]
    conversations = []
    for c in range(num_conversations):
        (p_len, o_len), *later = lengths[c * turns:(c + 1) * turns]
        prefix = prefixes[c % len(prefixes)]
        text, ids = builder.build(len(prefix) + p_len, rng, prefix)
        follow_ups = tuple(FollowUp(builder.text(n, rng), out) for n, out in later)
        conversations.append(Conversation(BenchRequest(text, tuple(ids), o_len), follow_ups))
    return conversations


def warm_up_request(tokenizer: PreTrainedTokenizerBase, like: BenchRequest, seed: int) -> BenchRequest:
    """A request of `like`'s lengths whose words come from a generator of their own, so warming up
    leaves nothing in a prefix cache that a measured request could reuse (beyond a BOS or a
    chance first word)."""
    text, ids = PromptBuilder(tokenizer).build(like.prompt_len, random.Random(f"warm-up {seed}"))
    return BenchRequest(text, tuple(ids), like.output_len)


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
