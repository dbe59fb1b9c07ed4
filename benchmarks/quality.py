"""What quantization costs in quality, measured through the API of any server.

Two measures, against the same weights served in bf16:

- perplexity of a public-domain text (`data/opticks_queries.txt`: the Queries of Newton's
  Opticks, 1704, ~5,000 SmolLM2 tokens) from the prompt logprobs a server returns for
  `/v1/completions` with `echo: true, logprobs: 0, max_tokens: 0`. The text is read in windows
  of `--window` tokens that advance by `--stride`; each token is scored once, with at least
  `window - stride` tokens of context (the first window's tokens with what precedes them).
- greedy agreement: N prompts (`--prompts`, slices of the same text) continued for 64 tokens at
  temperature 0; the share of generated tokens equal to bf16's at the same position before
  the first difference, and how many continuations are identical in full.

Configurations: lightserve launched with each of `--configs` (bf16, w8a8, kv8, w8a8+kv8), one
at a time; `--base-url URL --name NAME` adds a running server (vLLM, another build) measured
the same way. Prompts go as token ids, so every server scores the same tokens.

    python benchmarks/quality.py                       # the four lightserve configurations
    python benchmarks/quality.py --configs bf16,w8a8 --base-url http://127.0.0.1:8001 --name vllm
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Optional

import httpx
from transformers import AutoTokenizer

from lightserve.benchmark.launch import LaunchedServer
from lightserve.benchmark.report import cpu_name
from lightserve.utils.embedded_model import embedded_model_dir

TEXT = Path(__file__).parent / "data" / "opticks_queries.txt"
CONFIGS = {
    "bf16": [],
    "w8a8": ["--quantization", "w8a8"],
    "kv8": ["--kv_cache_dtype", "int8"],
    "w8a8+kv8": ["--quantization", "w8a8", "--kv_cache_dtype", "int8"],
    "w8a8+head": ["--quantization", "w8a8", "--quantize_lm_head"],
}




def prompt_logprobs(client: httpx.Client, url: str, model: str, ids: list[int]) -> list[Optional[float]]:
    """The logprob of every prompt token given the ones before it (None for the first)."""
    r = client.post(url + "/v1/completions", json={"model": model, "prompt": ids, "echo": True, "logprobs": 0,
                                                   "max_tokens": 0, "temperature": 0.0})
    r.raise_for_status()
    lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
    if len(lps) != len(ids):
        raise RuntimeError(f"{url}: {len(lps)} prompt logprobs for {len(ids)} prompt tokens")
    return lps


def perplexity(client: httpx.Client, url: str, model: str, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of ids[1:], each token scored once; and how many were."""
    nll, scored, start = 0.0, 0, 0
    next_to_score = 1  # the first token has no logprob
    while next_to_score < len(ids):
        end = min(start + window, len(ids))
        lps = prompt_logprobs(client, url, model, ids[start:end])
        for pos in range(max(next_to_score, start + 1), end):
            nll -= lps[pos - start]
            scored += 1
        next_to_score = end
        start = end - (window - stride) if end < len(ids) else end
    return math.exp(nll / scored), scored


def greedy(client: httpx.Client, url: str, model: str, prompts: list[list[int]], n: int, tokenizer) -> list[list[int]]:
    """Each prompt's greedy continuation as token ids (its text tokenized again: the one form
    every OpenAI-compatible server returns)."""
    outs = []
    for ids in prompts:
        r = client.post(url + "/v1/completions", json={"model": model, "prompt": ids, "max_tokens": n,
                                                       "temperature": 0.0, "ignore_eos": True})
        r.raise_for_status()
        outs.append(tokenizer(r.json()["choices"][0]["text"], add_special_tokens=False).input_ids)
    return outs


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, int]:
    """Share of tokens equal to the reference before each continuation's first difference, and
    the continuations equal in full."""
    same, total, whole = 0, 0, 0
    for a, b in zip(reference, other):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += k
        total += len(a)
        whole += int(a == b)
    return same / total, whole


def measure(url: str, model: str, ids: list[int], prompts: list[list[int]], tokenizer, args: argparse.Namespace) -> dict:
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        ppl, scored = perplexity(client, url, model, ids, args.window, args.stride)
        outs = greedy(client, url, model, prompts, args.new_tokens, tokenizer)
        return {"ppl": ppl, "scored": scored, "outs": outs, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--configs", default="bf16,w8a8,kv8,w8a8+kv8", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--base-url", default=None, help="also measure this running OpenAI-compatible server")
    parser.add_argument("--name", default="external", help="its name in the table")
    parser.add_argument("--served-model", default=None, help="`model` field for --base-url (default: --model-dir)")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = str(args.model_dir or embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(TEXT.read_text()).input_ids
    step = (len(ids) - args.prompt_len) // args.prompts
    prompts = [ids[i * step : i * step + args.prompt_len] for i in range(args.prompts)]
    print(f"{cpu_name()}; {model_dir}; text {len(ids)} tokens, window {args.window} stride {args.stride}; "
          f"{args.prompts} prompts x {args.new_tokens} greedy tokens")

    results: dict[str, dict] = {}
    for name in args.configs.split(","):
        with LaunchedServer(model_dir, "bfloat16", ["--max_req_total_len", str(args.window + args.new_tokens),
                                                    *CONFIGS[name]]) as server:
            results[name] = measure(server.url, model_dir, ids, prompts, tokenizer, args)
        print(f"  measured {name} in {results[name]['seconds']:.0f} s", flush=True)
    if args.base_url:
        results[args.name] = measure(args.base_url, args.served_model or model_dir, ids, prompts, tokenizer, args)

    base = results.get("bf16")
    print(f"\n{'server':12s} {'perplexity':>10s} {'vs bf16':>8s} {'greedy agreement':>17s} {'identical':>10s}")
    for name, r in results.items():
        rel = f"{100 * (r['ppl'] / base['ppl'] - 1):+7.2f}%" if base else "-"
        if base:
            share, whole = agreement(base["outs"], r["outs"])
            agree = f"{100 * share:16.1f}% {whole:>4d} / {len(prompts):<3d}"
        else:
            agree = "-"
        print(f"{name:12s} {r['ppl']:10.3f} {rel:>8s} {agree}")


if __name__ == "__main__":
    main()
