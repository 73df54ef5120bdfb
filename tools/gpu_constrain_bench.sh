#!/usr/bin/env bash
# Constrained decoding and token healing on the GPU (issues 23 and 15), the Llama-3-8B config with random weights:
#   TPOT of 64 concurrent JSON-schema requests (jaxllm/bench/schemas/records.json, at least 64 records, so every
#   answer runs to its length) against 64 unconstrained ones, and the host time the engine spends building the
#   allowed-token masks per constrained step (the server's stats line: "token masks: X ms/step, engine waited
#   Y ms/step": the mask worker's fill, and the engine thread's wait for it), and the round trip to the worker
#   (python -m jaxllm.bench.masks);
#   TTFT of single 512-token requests without and with --token_healing_mode.
# JSON under $OUT (tables and server logs under $LOGS), a table last. The device needs the llguidance wheel.
# Usage on the device machine (carry .whl and the tokenizer dir):  TOKENIZER_DIR=.devtmp/tok bash tools/gpu_constrain_bench.sh
# (HEALING=0 skips the token-healing server; THREADS="4 8 12" runs bench.masks at each llguidance pool size, the
# server keeps JAXLLM_GRAMMAR_THREADS from the environment; XLA_FLAGS reach the server too.)
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-constrain
PORT=${PORT:-8012}
URL=http://127.0.0.1:$PORT
SERVER_FLAGS=(--model_dir "$MODEL" --load_format dummy --data_type bf16 --port "$PORT" --tokenizer_mode fast
  --max_total_token_num ${KV_TOKENS:-262144} --running_max_req_size 256 --batch_max_tokens 8192
  --max_req_input_len 2048 --max_req_total_len 3072 --log_stats_interval 5)
source tools/serve_env.sh
SCHEMA=jaxllm/bench/schemas/records.json
BATCH=(--num-prompts 64 --input-len 256 --output-len 256 --request-rate inf)
SINGLE=(--num-prompts 32 --input-len 512 --output-len 16 --max-concurrency 1)

start_server constrain || exit 1
bench warmup_free "${BATCH[@]}" --seed 9 > /dev/null  # compiles the shapes both runs meet
bench warmup_schema "${BATCH[@]}" --seed 9 --json-schema "$SCHEMA" > /dev/null
for seed in ${SEEDS:-1}; do  # SEEDS="1 2 3": more timed pairs on new prompts (seed 1's names keep no suffix)
  suffix=; [ "$seed" = 1 ] || suffix=_s$seed
  bench free_64$suffix "${BATCH[@]}" --seed "$seed"
  bench schema_64$suffix "${BATCH[@]}" --seed "$seed" --json-schema "$SCHEMA"
done
sleep 6  # one more stats line
grep -o "token masks: .*" "$LOGS/server_constrain.log" | tail -3 | tee "$LOGS/mask_time.txt"
# The round trip to the mask worker and its fill, without a model, at the config's mask width:
WORDS=$($PY -c "import json, sys; print((json.load(open(sys.argv[1]))['vocab_size'] + 31) // 32)" "$MODEL/config.json")
for threads in ${THREADS:-0}; do  # THREADS="4 8 12": the worker's llguidance pool sizes to try (0: its default)
  echo "llguidance threads: ${threads/#0/default}" | tee -a "$LOGS/mask_time.txt"
  JAXLLM_GRAMMAR_THREADS=${threads/#0/} $PY -m jaxllm.bench.masks --tokenizer "$MODEL" --words "$WORDS" 2>&1 \
    | tail -7 | tee -a "$LOGS/mask_time.txt"
done
bench warmup_single "${SINGLE[@]}" --seed 8 > /dev/null
bench ttft_plain "${SINGLE[@]}" --seed 2
stop_server

if [ "${HEALING:-1}" = 1 ]; then  # HEALING=0: the constrained runs only
  start_server healing --token_healing_mode || exit 1
  bench warmup_single_healing "${SINGLE[@]}" --seed 8 > /dev/null
  bench ttft_healing "${SINGLE[@]}" --seed 2
  stop_server
fi

echo "== summary"
$PY - "$OUT" "$LOGS/mask_time.txt" << 'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = {f.stem: json.loads(f.read_text()) for f in out.glob("*.json")}
for name in sorted(r):
    print(f"{name:<14} TTFT med {r[name]['ttft_ms']['median']:8.1f} ms  TPOT med {r[name]['tpot_ms']['median']:7.2f} ms"
          f"  out {r[name]['output_throughput']:8.1f} tok/s")
for free in sorted(n for n in r if n.startswith("free_64")):
    schema = free.replace("free", "schema")
    if schema in r:
        print(f"TPOT schema / free ({free}): {r[schema]['tpot_ms']['median'] / r[free]['tpot_ms']['median']:.3f} (goal <= 1.1)")
if "ttft_plain" in r and "ttft_healing" in r:
    print(f"token healing adds {r['ttft_healing']['ttft_ms']['median'] - r['ttft_plain']['ttft_ms']['median']:.1f} ms TTFT (median)")
print(Path(sys.argv[2]).read_text().strip())
PYEOF
