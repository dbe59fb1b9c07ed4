"""`python -m lightserve.benchmark`: the command line, and the order in which things run."""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from transformers import AutoTokenizer

from lightserve.benchmark.client import run_load, warm_up
from lightserve.benchmark.hf_baseline import DTYPES, HFResult, run_hf_baseline
from lightserve.benchmark.launch import LaunchedServer
from lightserve.benchmark.plot import write_plot
from lightserve.benchmark.report import format_comparison, format_hf, format_run, workload_summary, write_json
from lightserve.benchmark.stats import RunSummary, summarize
from lightserve.benchmark.workload import BenchRequest, LengthSpec, load_jsonl, synthetic_workload

_FROM_LAUNCH = "<the --launch model>"

EPILOG = """\
examples:
  # one command: start the server, run 256 requests at once (64 in flight), then transformers on 128 of them
  python -m lightserve.benchmark --launch ~/.cache/lightserve/models/SmolLM2-135M-Instruct --hf-baseline \\
      --num-requests 256 --prompt-len 32:512 --output-len 32:256 --max-concurrency 64 --hf-max-requests 128
  # a running server, several Poisson rates
  python -m lightserve.benchmark --url http://127.0.0.1:8000 --tokenizer MODEL_DIR --request-rate 1,2,4,inf
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
    server.add_argument("--url", default=None, help="a running server (default http://127.0.0.1:8000 without --launch)")
    server.add_argument("--launch", metavar="MODEL_DIR", default=None,
                        help="start `python -m lightserve.api_server` on this model for the run and stop it after")
    server.add_argument("--server-args", default="", help="extra flags for the launched server, one quoted string")
    work = p.add_argument_group("workload")
    work.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the --launch or --hf-baseline model)")
    work.add_argument("--dataset", default=None, help="JSONL of {\"prompt\", optional \"output_len\"} instead of synthetic prompts")
    work.add_argument("--num-requests", type=int, default=256)
    work.add_argument("--prompt-len", type=LengthSpec.parse, default=LengthSpec(32, 512),
                      help="N, LO:HI (uniform) or LO:HI:normal, in tokens incl. special tokens (default 32:512)")
    work.add_argument("--output-len", type=LengthSpec.parse, default=LengthSpec(32, 256),
                      help="same syntax; max_new_tokens of each request (default 32:256)")
    work.add_argument("--seed", type=int, default=0, help="seeds lengths, prompts and Poisson arrivals")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=parse_rates, default=[math.inf],
                      help="requests/s of a Poisson process, comma-separated for several runs (inf: all at once)")
    load.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default: none)")
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
    for name in ("num_requests", "max_concurrency", "hf_batch_size", "hf_max_requests"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


def make_workload(args: argparse.Namespace) -> list[BenchRequest]:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.dataset:
        return load_jsonl(args.dataset, tokenizer, args.output_len, args.seed, limit=args.num_requests)
    return synthetic_workload(tokenizer, args.num_requests, args.prompt_len, args.output_len, args.seed)


def run_server_side(args: argparse.Namespace, requests: list[BenchRequest]) -> list[RunSummary]:
    """Warm up once, then one pass of the workload per request rate."""
    launched = LaunchedServer(args.launch, args.dtype, shlex.split(args.server_args)) if args.launch else None
    with launched or nullcontext():
        url = launched.url if launched else (args.url or "http://127.0.0.1:8000").rstrip("/")
        if launched:
            print(f"server started at {url} (log: {launched.log_path})")
        asyncio.run(warm_up(url, requests[0], args.ignore_eos))
        summaries = []
        for rate in args.request_rate:
            result = asyncio.run(run_load(url, requests, rate, args.max_concurrency, args.ignore_eos, args.seed,
                                          progress=not args.no_progress))
            summaries.append(summarize(result))
            print(format_run(summaries[-1]), flush=True)
    return summaries


def run_baseline(args: argparse.Namespace, requests: list[BenchRequest]) -> Optional[HFResult]:
    if not args.hf_baseline:
        return None
    batch = args.hf_batch_size or args.max_concurrency or 64
    hf = run_hf_baseline(args.hf_baseline, requests, batch, args.dtype, args.hf_max_requests,
                         progress=not args.no_progress)
    print(format_hf(hf), flush=True)
    return hf


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    requests = make_workload(args)
    w = workload_summary(requests)
    print(f"workload: {w['num_requests']} requests, prompt tokens {w['prompt_len']['min']}-{w['prompt_len']['max']} "
          f"(total {w['total_prompt_tokens']}), output tokens {w['output_len']['min']}-{w['output_len']['max']} "
          f"(total {w['total_output_tokens']}), seed {args.seed}", flush=True)
    # The server is stopped (when launched here) before transformers runs: they never share the CPU.
    runs = run_server_side(args, requests)
    hf = run_baseline(args, requests)
    if hf:
        print(format_comparison(runs, hf))
    config = {k: (str(v) if isinstance(v, LengthSpec) else v) for k, v in vars(args).items()}
    config["request_rate"] = ["inf" if math.isinf(r) else r for r in args.request_rate]
    write_json(args.output_json, config, requests, runs, hf)
    png = args.output_png or str(Path(args.output_json).with_suffix(".png"))
    why_not = write_plot(png, runs, hf)
    print(f"results: {args.output_json}" + (f", plot: {png}" if why_not is None else f" ({why_not})"))
    return 0 if all(s.failed == 0 for s in runs) else 1
