"""Cost per decode step of a grammar's token masks, llguidance against xgrammar.

For B requests each constrained by a JSON schema, a step needs one allowed-token mask per row
(before sampling) and one advance per row (after it). This times both libraries on the same
tokenizer and schema, walking every row through a valid JSON document token by token, so the
masks are those of a real decode (not of the first position only).

    python benchmarks/grammar_mask_cost.py --batch 64 --steps 60

It is how lightserve's grammar library was chosen (docs/performance.md, "Structured output").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "tags", "address"],
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "tags": ["red", "blue"], "address": {"city": "London", "zip": "W1"}}


def _walk(tokenizer, steps: int) -> list[int]:
    ids = tokenizer(json.dumps(DOCUMENT), add_special_tokens=False).input_ids
    return ids[:steps]


def time_llguidance(tokenizer, batch: int, tokens: list[int]) -> tuple[list[float], list[float], float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    setup = time.perf_counter() - t0
    grammar = llguidance.grammar_from("json_schema", json.dumps(SCHEMA))
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
    executor = llguidance.LLExecutor()
    bitmask = lt.allocate_token_bitmask(batch, lltok.vocab_size)
    fill, advance = [], []
    for token in tokens:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        t1 = time.perf_counter()
        for m in matchers:
            assert m.consume_token(token), m.get_error()
        t2 = time.perf_counter()
        fill.append(t1 - t0)
        advance.append(t2 - t1)
    return fill, advance, setup


def time_xgrammar(tokenizer, batch: int, tokens: list[int], vocab_size: int) -> tuple[list[float], list[float], float]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    setup = time.perf_counter() - t0
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, info.vocab_size)
    batched = xgr.BatchGrammarMatcher(max_threads=2)
    fill, advance = [], []
    for token in tokens:
        t0 = time.perf_counter()
        batched.batch_fill_next_token_bitmask(matchers, bitmask)
        t1 = time.perf_counter()
        assert all(batched.batch_accept_token(matchers, [token] * batch))
        t2 = time.perf_counter()
        fill.append(t1 - t0)
        advance.append(t2 - t1)
    return fill, advance, setup


def main() -> None:
    from lightserve.utils.embedded_model import embedded_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="tokenizer directory (default: the embedded SmolLM2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model or embedded_model_dir())
    tokens = _walk(tokenizer, args.steps)
    vocab = len(tokenizer)
    print(f"B={args.batch}, {len(tokens)} tokens of a valid document, vocabulary {vocab}")
    for name, run in (("llguidance", lambda: time_llguidance(tokenizer, args.batch, tokens)),
                      ("xgrammar", lambda: time_xgrammar(tokenizer, args.batch, tokens, vocab))):
        fill, advance, setup = run()
        print(f"{name:11s} masks per step: median {1e3 * statistics.median(fill):6.2f} ms, "
              f"max {1e3 * max(fill):6.2f} ms; advance per step: median {1e3 * statistics.median(advance):5.2f} ms; "
              f"set-up {setup:.2f} s")


if __name__ == "__main__":
    main()
