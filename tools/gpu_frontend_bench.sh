#!/usr/bin/env bash
# Issue 22 item 1 on the H200: 512 requests x (128 in / 128 out), all at once, through the server (`jaxllm.bench
# serve` against `jaxllm.serve`: HTTP frontend + engine-core process) and through the in-process engine
# (`jaxllm.bench offline`), random-weight Llama-3-8B, the flags of the issue's measurement. Prints output tok/s
# server / in-process (goal >= 0.95) and the inter-token gap median / p99 against the median TPOT (goal p99 <= 3 x
# TPOT). About 6 minutes of device time (two start-ups; the second finds the compilation cache warm), plus 1-3
# minutes on the CPU first (the host side: bench.frontend's text + SSE capacity, bench.host; FRONTEND=0 and HOST=0 skip
# them; OFFLINE=0 skips the in-process run). The frontend's and the engine core's CPU seconds per thread over the
# timed server run go to threads.txt. The server's runs start after its background compiles (the shapes it builds
# after /health) have ended, as the in-process run's timing starts after its compiles.
# EXTRA_FLAGS go to both (e.g. EXTRA_FLAGS="--splitfuse_mode --splitfuse_block_size 2048": prefill chunks mixed
# with the decodes, for the gap goal); CLIENT_PROCESSES=4 deals the requests to 4 client processes (one event loop
# reading 512 streams falls behind and reads tokens in clumps), then runs once more with one, for the difference.
# Usage on the device machine (carry .whl and the tokenizer dir):
#   TOKENIZER_DIR=.devtmp/tok bash tools/gpu_frontend_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-frontend-bench
PORT=${PORT:-8012}
URL=http://127.0.0.1:$PORT
ENGINE_FLAGS=(--load_format dummy --data_type bf16 --tokenizer_mode fast --max_total_token_num 500000
  --running_max_req_size 512 --batch_max_tokens 8192 --max_req_input_len 2048 --max_req_total_len 3072
  ${EXTRA_FLAGS:-})
SERVER_FLAGS=(--model_dir "$MODEL" --port "$PORT" "${ENGINE_FLAGS[@]}")
WORKLOAD=(--num-prompts ${PROMPTS:-512} --input-len 128 --output-len 128 --seed 1)
STARTUP_FILE=$OUT/startup.txt START_TIMEOUT=400 BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
source tools/serve_env.sh
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxllm/jax}

echo "== host side, on the CPU: the frontend's text + SSE capacity, the engine thread's host us per row per step"
if [ "${FRONTEND:-1}" = 1 ]; then  # FRONTEND=0 skips it
  $PY -m jaxllm.bench.frontend --rows 512 --tokenizer "$TOKENIZER_DIR" | tee "$OUT/frontend_host.json"
fi
if [ "${HOST:-1}" = 1 ]; then  # a 2-layer, 64-wide model of $MODEL's tokenizer: the host's share alone
  TINY=$(mktemp -d); cp "$TOKENIZER_DIR"/* "$TINY/"
  $PY -c "import json, sys; c = json.load(open(sys.argv[1])); c.update(hidden_size=64, intermediate_size=128,
num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16); json.dump(c, open(sys.argv[2], 'w'))" \
    "$MODEL/config.json" "$TINY/config.json"
  JAX_PLATFORMS=cpu timeout ${HOST_TIMEOUT:-400} $PY -m jaxllm.bench.host --model_dir "$TINY" --data_type float32 \
    --tokenizer_mode fast 2> "$LOGS/host.err" | tee "$OUT/host.json"
fi

if [ "${OFFLINE:-1}" = 1 ]; then  # OFFLINE=0: the server alone (no ratio printed)
  echo "== in-process engine (one untimed pass first)"
  timeout ${OFFLINE_TIMEOUT:-400} $PY -m jaxllm.bench offline --model_dir "$MODEL" --warmup-pass "${WORKLOAD[@]}" \
    --result-json "$OUT/offline.json" "${ENGINE_FLAGS[@]}" > "$LOGS/offline.txt" 2> "$LOGS/offline.err"
  grep -E "throughput|steps" "$LOGS/offline.txt" || tail -20 "$LOGS/offline.err"
fi

echo "== server (one untimed run first)"
start_server split || exit 1
wait_background_compiles split | tee -a "$STARTUP_FILE"
bench warmup_serve "${WORKLOAD[@]}" > /dev/null
# CPU seconds per thread of the frontend and the engine core over the timed run (the client's start-up included)
PIDS="$SERVER_PID $(pgrep -P "$SERVER_PID" -f jaxllm.engine.core | head -1)"
$PY -m jaxllm.bench.threads $PIDS --out "$LOGS/threads_before.json"
bench serve "${WORKLOAD[@]}"
echo "== CPU per thread over the timed run: frontend, then engine core"
$PY -m jaxllm.bench.threads $PIDS --since "$LOGS/threads_before.json" | tee "$OUT/threads.txt"
if [ "${CLIENT_PROCESSES:-1}" != 1 ]; then  # the same server read by one client process: the client's share
  CLIENT_PROCESSES=1 bench serve_one_client "${WORKLOAD[@]}"
fi
http_get /metrics | grep -E "^lightllm_batch_inference_count_total" | tee "$LOGS/metrics.txt"
stop_server

[ -f "$OUT/offline.json" ] || exit 0
echo "== summary"
$PY - "$OUT" << 'EOF_PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
offline = json.loads((out / "offline.json").read_text())
serve = json.loads((out / "serve.json").read_text())
ratio = serve["output_throughput"] / offline["output_throughput"]
tpot, itl = serve["tpot_ms"]["median"], serve["itl_ms"]
print(f"output tok/s: server {serve['output_throughput']:.0f}, in-process {offline['output_throughput']:.0f}, "
      f"ratio {ratio:.3f} (goal >= 0.95)")
print(f"inter-token gap median {itl['median']:.2f} ms, p99 {itl['p99']:.2f} ms; median TPOT {tpot:.2f} ms; "
      f"p99 / TPOT {itl['p99'] / tpot:.2f} (goal <= 3)")
print(f"server: {serve['completed']} completed, {serve['failed']} failed; TTFT median {serve['ttft_ms']['median']:.0f} ms")
one = out / "serve_one_client.json"
if one.exists():
    one = json.loads(one.read_text())
    print(f"read by one client process: {one['output_throughput']:.0f} tok/s, gap median {one['itl_ms']['median']:.2f} "
          f"ms, p99 {one['itl_ms']['p99']:.2f} ms; median TPOT {one['tpot_ms']['median']:.2f} ms")
EOF_PY
