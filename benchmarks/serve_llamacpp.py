"""Start llama.cpp's own HTTP server (the `xllamacpp` wheel) the way the side-by-side runs use it.

    python -m venv llamacpp-venv && llamacpp-venv/bin/pip install xllamacpp
    llamacpp-venv/bin/python benchmarks/serve_llamacpp.py MODEL.gguf --port 8200 --parallel 64

Then drive it like any OpenAI server:

    python -m lightserve.benchmark --backend openai --base-url http://127.0.0.1:8200 --model MODEL_DIR ...

Settings, and why:
- `--parallel` slots with **one KV stream per slot** (`kv_unified = False`): with a unified KV every
  sequence attends over every cell of the shared buffer, which is several times slower at 64 slots.
- Each slot gets `--slot-context` tokens (the KV buffer is `parallel x slot-context`).
- Both the generation and the batch thread pools use `--threads` (the machine's cores by default).
- Prompt caching stays at llama.cpp's default (on), like the other servers' prefix caches.

This file runs in its own venv: it imports only `xllamacpp` and the standard library.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

import xllamacpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--parallel", type=int, default=64, help="slots: requests decoded together")
    parser.add_argument("--slot-context", type=int, default=1024, help="KV tokens per slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.kv_unified = False
    params.n_ctx = args.parallel * args.slot_context
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads

    server = xllamacpp.Server(params)  # serves HTTP from its own threads until the process ends
    print(f"llama.cpp {xllamacpp.__version__} serving {args.model} at {server.listening_address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    main()
