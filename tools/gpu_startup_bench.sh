#!/usr/bin/env bash
# Issue 22 item 5 in one device call: the server's launch to /health (`python -m jaxllm.bench startup`: cold =
# an empty compilation cache, warm = the cache the cold start wrote; each with the engine core's phases and the
# compilations each built or read) on the Llama-3-8B config, with real safetensors (the random Llama-3-8B of
# .peer/peer_model.py, 16 GB of bf16, in /dev/shm when it has room, else /tmp: the weights phase's GB/s; the
# files were just written, so they are read from the page cache) and with random weights (--load_format dummy).
# The weights load while the step shapes compile: the `weights-hf` line is the load's own seconds, `weights-wait`
# what the start still waited for it after compiling. COMPILE_THREADS (default: the runner's) sets
# JAXLLM_COMPILE_THREADS. WHICH: "real", "dummy" or "all" (default; about 8 minutes on an H200: run the two
# apart when the device call's 10 minutes are tight).
# Usage on the device machine (carry .whl and .peer from ../shared/peer/prep.sh, and the tokenizer dir):
#   TOKENIZER_DIR=.devtmp/tok bash tools/gpu_startup_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-startup-bench
[ -n "${COMPILE_THREADS:-}" ] && export JAXLLM_COMPILE_THREADS=$COMPILE_THREADS
WHICH=${WHICH:-all}
FLAGS=(--data_type bf16 --max_total_token_num 140000 --running_max_req_size 256 --batch_max_tokens 8192
  --disable_log_stats)
CACHE=/tmp/jaxllm-startup-cache
if [ "$WHICH" != dummy ]; then
  WEIGHTS=/tmp/jaxllm-startup-model
  if [ "$(df --output=avail -B1G /dev/shm 2> /dev/null | tail -1)" -gt 40 ] 2> /dev/null; then
    WEIGHTS=/dev/shm/jaxllm-startup-model
  fi
  $PY .peer/peer_model.py --config "$CONFIG" --tokenizer "$TOKENIZER_DIR" --out "$WEIGHTS" > "$LOGS/peer_model.log" 2>&1 \
    || { tail -5 "$LOGS/peer_model.log"; exit 1; }
  echo "== safetensors from $WEIGHTS: cold, warm"
  $PY -m jaxllm.bench startup --model_dir "$WEIGHTS" --cache-dir "$CACHE" --result-json "$OUT/startup_hf.json" \
    --load_format hf "${FLAGS[@]}"
  rm -rf "$WEIGHTS"
fi
if [ "$WHICH" != real ]; then
  echo "== random weights: cold, warm"
  $PY -m jaxllm.bench startup --model_dir "$MODEL" --cache-dir "$CACHE" --result-json "$OUT/startup_dummy.json" \
    --load_format dummy "${FLAGS[@]}" || exit 1
fi
