"""Structured-output grammars: a request's `Grammar` turned into llguidance's grammar, checked.

Both sides use this module: the httpserver checks every grammar before a request is admitted, so
that a bad schema or regex gets a 400 naming the problem and no worker ever sees it; the backend
builds its matchers from the same compiled text.

Why llguidance (measured with `benchmarks/grammar_mask_cost.py`, docs/performance.md): it has no
ahead-of-time compile step to cache or bound (its lexer is built lazily, under fuel limits), it
computes the masks of a whole batch in parallel in Rust without the GIL, and its per-step cost
on a B=64 JSON-schema batch was the lower of the two libraries measured.
"""

from __future__ import annotations

import functools
import json

import llguidance

from lightserve.io_struct import GRAMMAR_KINDS, Grammar

# The text of one grammar (a schema, a regex, a choice list): bounded so that checking it is
# quick; llguidance's own limits (`LIMITS`) bound what it may build from it.
MAX_GRAMMAR_BYTES = 64 * 1024

# The layout of JSON answers (llguidance's `x-guidance` options), the one `json.dumps` writes.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The grammar cannot be used; the message says why (it is shown to the client)."""


def parser_limits() -> llguidance.LLParserLimits:
    """llguidance's bounds on grammar size and on the lexer and parser work of each step; a
    request that exceeds them fails alone with an error instead of stalling the batch."""
    return llguidance.LLParserLimits(max_grammar_size=200_000, step_lexer_fuel=200_000, max_lexer_states=100_000)


def compile_grammar(grammar: Grammar) -> str:
    """llguidance's grammar for `grammar`, checked; raises `GrammarError`. Cached by its text."""
    return _compile(grammar.kind, grammar.text)


@functools.lru_cache(maxsize=512)
def _compile(kind: str, text: str) -> str:
    if kind not in GRAMMAR_KINDS:
        raise GrammarError(f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {kind!r}")
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the {_NAMES[kind]} is longer than {MAX_GRAMMAR_BYTES} bytes")
    if not text.strip():
        raise GrammarError(f"the {_NAMES[kind]} is empty")
    if kind in ("json_schema", "choice"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise GrammarError(f"the {_NAMES[kind]} is not JSON: {exc}") from None
        if kind == "json_schema" and not isinstance(value, (dict, bool)):
            raise GrammarError("a JSON schema must be an object")
        if kind == "json_schema" and isinstance(value, dict) and "x-guidance" not in value:
            # One space after `:` and `,`, no other whitespace: without this, a weak or sampled
            # model can spend its whole budget on valid whitespace and be cut off mid-document.
            text = json.dumps({**value, "x-guidance": JSON_LAYOUT})
        if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise GrammarError("a choice list must be a non-empty list of strings")
    try:
        compiled = llguidance.grammar_from(kind, text)
        error = llguidance.LLMatcher.validate_grammar(compiled, None, limits=parser_limits())
    except (ValueError, RuntimeError, TypeError) as exc:
        error = str(exc)
    if error:
        raise GrammarError(f"invalid {_NAMES[kind]}: {error.strip()}")
    return compiled


_NAMES = {"json_schema": "JSON schema", "regex": "regular expression", "choice": "choice list", "lark": "grammar"}
