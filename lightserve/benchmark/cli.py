"""`python -m lightserve.benchmark`: the command line, and the order in which things run."""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import httpx
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lightserve.benchmark.client import Api, run_conversations, warm_up
from lightserve.benchmark.hf_baseline import DTYPES, HFResult, run_hf_baseline
from lightserve.benchmark.launch import LaunchedServer
from lightserve.benchmark.plot import write_plot
from lightserve.benchmark.report import (
    format_comparison, format_hf, format_run, format_workload, workload_summary, write_json,
)
from lightserve.benchmark.stats import RunSummary, summarize
from lightserve.benchmark.workload import (
    Conversation, LengthSpec, WorkloadShape, conversation_workload, load_jsonl, warm_up_request,
)

_FROM_LAUNCH = "<the --launch model>"

EPILOG = """\
examples:
  # one command: start the server, run 256 requests at once (64 in flight), then transformers on 128 of them
  python -m lightserve.benchmark --launch ~/.cache/lightserve/models/SmolLM2-135M-Instruct --hf-baseline \\
      --num-requests 256 --prompt-len 32:512 --output-len 32:256 --max-concurrency 64 --hf-max-requests 128
  # a running server, several Poisson rates
  python -m lightserve.benchmark --url http://127.0.0.1:8000 --tokenizer MODEL_DIR --request-rate 1,2,4,inf
  # for a prefix cache: 4 system prompts of 1024 tokens, each request's own 32-128 tokens after one
  python -m lightserve.benchmark --url http://127.0.0.1:8000 --tokenizer MODEL_DIR \\
      --shared-prefix-len 1024 --shared-prefix-groups 4 --prompt-len 32:128
  # any OpenAI-compatible server (vLLM, llama.cpp's), token-id prompts through /v1/completions
  python -m lightserve.benchmark --backend openai --base-url http://127.0.0.1:8100 --tokenizer MODEL_DIR \
      --shared-prefix-len 1024 --shared-prefix-groups 4 --prompt-len 32:128
  # 64 chats of 4 turns (256 requests), 16 at a time, each turn's prompt = the previous prompt + answer + message
  python -m lightserve.benchmark --url http://127.0.0.1:8000 --tokenizer MODEL_DIR \\
      --multi-turn 4 --num-requests 256 --prompt-len 32:128 --max-concurrency 16
"""


def parse_rates(text: str) -> list[float]:
    rates = [float(part) for part in text.split(",") if part.strip()]  # float("inf") parses "inf"
    if not rates or any(not (r > 0) for r in rates):
        raise argparse.ArgumentTypeError("request rates must be > 0 (inf: all at once)")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightserve.benchmark", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Serving benchmark of lightserve over HTTP, optionally beside transformers.")
    server = p.add_argument_group("server")
    server.add_argument("--url", "--base-url", default=None,
                        help="a running server (default http://127.0.0.1:8000 without --launch)")
    server.add_argument("--backend", choices=("tgi", "openai"), default="tgi",
                        help="the API to drive: lightserve's /generate_stream (tgi), or /v1/completions of any "
                             "OpenAI-compatible server such as vLLM or llama.cpp's (openai, token-id prompts)")
    server.add_argument("--no-stream", action="store_true",
                        help="ask for whole answers instead of token streams: pure throughput, no TTFT or "
                             "inter-token latencies")
    server.add_argument("--model", default=None,
                        help="the OpenAI `model` field (default: the first id of the server's /v1/models)")
    server.add_argument("--launch", metavar="MODEL_DIR", default=None,
                        help="start `python -m lightserve.api_server` on this model for the run and stop it after")
    server.add_argument("--server-args", default="", help="extra flags for the launched server, one quoted string")
    work = p.add_argument_group("workload")
    work.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the --launch or --hf-baseline model)")
    work.add_argument("--dataset", default=None, help="JSONL of {\"prompt\", optional \"output_len\"} instead of synthetic prompts")
    work.add_argument("--num-requests", type=int, default=256,
                      help="requests in all (default 256); with --multi-turn T, the turns of all conversations: "
                           "a multiple of T")
    work.add_argument("--prompt-len", type=LengthSpec.parse, default=LengthSpec(32, 512),
                      help="N, LO:HI (uniform) or LO:HI:normal, in tokens incl. special tokens (default 32:512); "
                           "with a shared prefix, the suffix after it; with --multi-turn, each turn's user message")
    work.add_argument("--output-len", type=LengthSpec.parse, default=LengthSpec(32, 256),
                      help="same syntax; max_new_tokens of each request (default 32:256)")
    work.add_argument("--seed", type=int, default=0, help="seeds lengths, prompts and Poisson arrivals")
    work.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                      help="every prompt starts with one of the shared prefixes of exactly N tokens (incl. special "
                           "tokens), then its own --prompt-len suffix (default 0: none)")
    work.add_argument("--shared-prefix-groups", type=int, default=1, metavar="G",
                      help="number of distinct shared prefixes; request i (conversation i with --multi-turn) "
                           "takes prefix i mod G (default 1)")
    work.add_argument("--multi-turn", type=int, default=0, metavar="T",
                      help="conversations of T turns: turn k's prompt is turn k-1's prompt + the server's answer + "
                           "a new --prompt-len user message; a conversation's turns run one after another, "
                           "conversations side by side (default 0: independent requests)")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=parse_rates, default=[math.inf],
                      help="requests/s of a Poisson process, comma-separated for several runs (inf: all at once); "
                           "with --multi-turn, conversations/s")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="cap on requests in flight (default: none); with --multi-turn, on conversations in progress")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="generate exactly the requested output lengths (default: on)")
    hf = p.add_argument_group("transformers baseline")
    hf.add_argument("--hf-baseline", nargs="?", const=_FROM_LAUNCH, default=None, metavar="MODEL_DIR",
                    help="also run the workload through transformers (no value: the --launch model)")
    hf.add_argument("--hf-batch-size", type=int, default=None, help="static batch size (default: --max-concurrency, else 64)")
    hf.add_argument("--hf-max-requests", type=int, default=None,
                    help="run transformers on the first K requests only; its rate stands for the workload")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="dtype of transformers and of the launched server (default bfloat16)")
    out = p.add_argument_group("output")
    out.add_argument("--output-json", default="serving_benchmark.json")
    out.add_argument("--output-png", default=None, help="default: the JSON path with .png")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.url and args.launch:
        p.error("give --url or --launch, not both")
    if args.hf_baseline == _FROM_LAUNCH:
        if not args.launch:
            p.error("--hf-baseline without a MODEL_DIR needs --launch")
        args.hf_baseline = args.launch
    args.tokenizer = args.tokenizer or args.launch or args.hf_baseline
    if not args.tokenizer:
        p.error("prompts are built with the model's tokenizer: give --tokenizer (or --launch / --hf-baseline)")
    for name in ("num_requests", "max_concurrency", "hf_batch_size", "hf_max_requests", "shared_prefix_groups"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    _check_shape(p, args)


def _check_shape(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.shared_prefix_len < 0 or args.multi_turn < 0:
        p.error("--shared-prefix-len and --multi-turn must be >= 0")
    if args.shared_prefix_groups > 1 and not args.shared_prefix_len:
        p.error("--shared-prefix-groups needs --shared-prefix-len")
    if args.dataset and (args.shared_prefix_len or args.multi_turn):
        p.error("--shared-prefix-len and --multi-turn shape synthetic prompts, not --dataset ones")
    if args.multi_turn and args.num_requests % args.multi_turn:
        p.error(f"--num-requests counts turns: make it a multiple of --multi-turn {args.multi_turn}")
    if args.multi_turn > 1 and args.hf_baseline:
        p.error("--hf-baseline cannot run --multi-turn: later prompts are made from the server's answers")


def workload_shape(args: argparse.Namespace) -> WorkloadShape:
    return WorkloadShape(args.shared_prefix_len, args.shared_prefix_groups, args.multi_turn)


def make_workload(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> list[Conversation]:
    """The workload as conversations (one turn each unless --multi-turn)."""
    if args.dataset:
        return [Conversation(r) for r in load_jsonl(args.dataset, tokenizer, args.output_len, args.seed,
                                                    limit=args.num_requests)]
    shape = workload_shape(args)
    return conversation_workload(tokenizer, args.num_requests // shape.turns, args.prompt_len, args.output_len,
                                 args.seed, shape)


def run_server_side(args: argparse.Namespace, workload: list[Conversation],
                    tokenizer: PreTrainedTokenizerBase) -> list[RunSummary]:
    """Warm up once, then one pass of the workload per request rate."""
    launched = LaunchedServer(args.launch, args.dtype, shlex.split(args.server_args)) if args.launch else None
    with launched or nullcontext():
        url = launched.url if launched else (args.url or "http://127.0.0.1:8000").rstrip("/")
        if launched:
            print(f"server started at {url} (log: {launched.log_path})")
        api = Api(args.backend, (args.model or served_model(url)) if args.backend == "openai" else "",
                  stream=not args.no_stream)
        asyncio.run(warm_up(url, warm_up_request(tokenizer, workload[0].first, args.seed), args.ignore_eos, api))
        summaries = []
        for rate in args.request_rate:
            result = asyncio.run(run_conversations(url, workload, tokenizer, rate, args.max_concurrency,
                                                   args.ignore_eos, args.seed, progress=not args.no_progress, api=api))
            summaries.append(summarize(result))
            print(format_run(summaries[-1], "lightserve" if launched else f"{args.backend} server at {url}"), flush=True)
    return summaries


def served_model(url: str) -> str:
    """The first model id an OpenAI-compatible server lists."""
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run_baseline(args: argparse.Namespace, workload: list[Conversation]) -> Optional[HFResult]:
    if not args.hf_baseline:
        return None
    batch = args.hf_batch_size or args.max_concurrency or 64
    hf = run_hf_baseline(args.hf_baseline, [c.first for c in workload], batch, args.dtype, args.hf_max_requests,
                         progress=not args.no_progress)
    print(format_hf(hf), flush=True)
    return hf


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    workload = make_workload(args, tokenizer)
    summary = workload_summary(workload, workload_shape(args))
    print(format_workload(summary, args.seed), flush=True)
    # The server is stopped (when launched here) before transformers runs: they never share the CPU.
    runs = run_server_side(args, workload, tokenizer)
    hf = run_baseline(args, workload)
    if hf:
        print(format_comparison(runs, hf))
    config = {k: (str(v) if isinstance(v, LengthSpec) else v) for k, v in vars(args).items()}
    config["request_rate"] = ["inf" if math.isinf(r) else r for r in args.request_rate]
    write_json(args.output_json, config, summary, runs, hf)
    png = args.output_png or str(Path(args.output_json).with_suffix(".png"))
    why_not = write_plot(png, runs, hf)
    print(f"results: {args.output_json}" + (f", plot: {png}" if why_not is None else f" ({why_not})"))
    return 0 if all(s.failed == 0 for s in runs) else 1
