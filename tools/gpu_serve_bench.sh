#!/usr/bin/env bash
# The GPU serving run (issues 7 and 8) in one device call, on a random-weight real config:
#   start-up time cold and with the persistent compilation cache; `jaxllm.bench serve` at several request
#   rates; TTFT of requests sharing a 2k-token prefix without and with --use_dynamic_prompt_cache; p99
#   inter-token latency of a steady stream of long prompts in the default mode and with --splitfuse_mode.
# Every timed serve bench writes JSON under $OUT (tables, warm-up runs and server logs under $LOGS); a table
# comes last.
# Usage on the device machine (carry .whl and the tokenizer dir):
#   TOKENIZER_DIR=.devtmp/tok bash tools/gpu_serve_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-serve-bench
PORT=${PORT:-8011}
URL=http://127.0.0.1:$PORT
SERVER_FLAGS=(--model_dir "$MODEL" --load_format dummy --data_type bf16 --port "$PORT"
  --max_total_token_num ${KV_TOKENS:-262144} --running_max_req_size 256 --batch_max_tokens 8192
  --max_req_input_len 3584 --max_req_total_len 4096 --disable_log_stats)
STARTUP_FILE=$OUT/startup.txt START_TIMEOUT=300 BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
source tools/serve_env.sh
MIXED=(--input-len 128 --input-len-max 1024 --output-len 128 --output-len-max 512)
LONG=(--input-len 1536 --input-len-max 2560 --output-len 128 --output-len-max 256)
PREFIX=(--shared-prefix-len 2048 --input-len 16 --input-len-max 48 --output-len 8 --max-concurrency 1)

echo "== start-up (cold: empty compilation cache; warm: the cache the cold start wrote)"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxllm/jax}
rm -rf "$JAX_COMPILATION_CACHE_DIR"
start_server cold || exit 1; stop_server
start_server warm || exit 1

bench warmup_mixed "${MIXED[@]}" --num-prompts 64 > /dev/null  # compiles the shapes the mixed runs meet
for rate in ${RATES:-4 16 inf}; do
  bench "serve_rate_$rate" "${MIXED[@]}" --num-prompts ${SERVE_PROMPTS:-200} --request-rate "$rate" --seed 1
done
bench warmup_long "${LONG[@]}" --num-prompts 24 > /dev/null
bench long_default "${LONG[@]}" --num-prompts ${LONG_PROMPTS:-48} --request-rate ${LONG_RATE:-2} --seed 2
bench prefix_nocache "${PREFIX[@]}" --num-prompts 24 --seed 3
stop_server

start_server prompt_cache --use_dynamic_prompt_cache || exit 1
# One request caches the prefix (and compiles the table fill); the timed ones share only the prefix with it.
bench prefix_cache_first "${PREFIX[@]}" --num-prompts 1 --seed 3 > /dev/null
bench prefix_cache "${PREFIX[@]}" --num-prompts 24 --seed 3
http_get /metrics | grep -E "^lightllm_prompt_cache_(hit|prompt)_tokens" | tee "$LOGS/prompt_cache_metrics.txt"
stop_server

start_server splitfuse --splitfuse_mode || exit 1
bench warmup_long_splitfuse "${LONG[@]}" --num-prompts 24 > /dev/null
bench long_splitfuse "${LONG[@]}" --num-prompts ${LONG_PROMPTS:-48} --request-rate ${LONG_RATE:-2} --seed 2
stop_server

echo "== summary"
$PY - "$OUT" << 'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print((out / "startup.txt").read_text().strip())
print(f"{'run':<20}{'req/s':>8}{'out tok/s':>11}{'TTFT med':>10}{'TTFT p99':>10}{'TPOT med':>10}{'ITL p99':>9}")
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem:<20}{r['request_throughput']:>8.2f}{r['output_throughput']:>11.1f}{r['ttft_ms']['median']:>10.1f}"
          f"{r['ttft_ms']['p99']:>10.1f}{r['tpot_ms']['median']:>10.2f}{r['itl_ms']['p99']:>9.1f}")
EOF
