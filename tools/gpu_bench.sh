#!/usr/bin/env bash
# The GPU engine run (issue 8) in one device call: model-step decode against the roofline (with the measured
# HBM bandwidth and matmul rate), Hugging Face transformers' generate as the sanity floor, and the offline
# engine: batch-1 decode, 512 × (128 in / 128 out), 256 × (128 in / 512 out) against the model step alone at
# batch 256 and the run's mean context (384: what the engine's host adds to each decode step), and 1,000 mixed
# requests (in 128–1024, out 128–512). SKIP_HF=1 leaves out transformers.
# The batch-1 and 512 runs first run their workload once untimed (--warmup-pass); the 1,000-request run does
# not, and reports how many step shapes compiled while timed. CB_FLAGS: an XLA_FLAGS value whose model step
# (batch 1 and 256) is compared with the default's at the end.
# JSON under $OUT (logs under $LOGS), a table last.
# Usage on the device machine (carry .whl and the tokenizer dir):  TOKENIZER_DIR=.devtmp/tok bash tools/gpu_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-bench
DTYPE=${DTYPE:-bf16}
quiet() { grep -v -E "Warning|warn\(|DeprecationWarning|it/s\]|req/s\]|shape/s\]" ; }
ENGINE=(--load_format dummy --data_type "$DTYPE" --max_total_token_num ${KV_TOKENS:-262144}
  --running_max_req_size ${MAX_RUNNING:-256} --batch_max_tokens 8192 --max_req_input_len 2048 --max_req_total_len 3072)

step() {  # step NAME [XLA_FLAGS]
  echo "== model step $1 (Pallas attention, decode at ${STEP_CONTEXT:-1024} context) XLA_FLAGS=${2:-}"
  XLA_FLAGS="${2:-}" timeout "${STEP_TIMEOUT:-150}" $PY -m jaxllm.bench.step --config "$CONFIG" \
    --batch ${STEP_BATCHES:-1 64 256} --context ${STEP_CONTEXT:-1024} --repeats 20 --result-json "$OUT/step_$1.json" \
    2>&1 | quiet | tee "$LOGS/step_$1.txt"
}
offline() {  # offline NAME XLA_FLAGS [bench flags]
  local name=$1 flags=$2; shift 2
  echo "== offline $name XLA_FLAGS=$flags"
  XLA_FLAGS="$flags" timeout "${OFFLINE_TIMEOUT:-240}" $PY -m jaxllm.bench offline --model_dir "$MODEL" ${WARMUP_PASS---warmup-pass} \
    --result-json "$OUT/offline_$name.json" "$@" "${ENGINE[@]}" 2>&1 | quiet | tail -11 | tee "$LOGS/offline_$name.txt"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null
$PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices()[0].device_kind)"
step default

if [ -z "${SKIP_HF:-}" ]; then
  echo "== Hugging Face transformers generate (sanity floor)"
  timeout "${HF_TIMEOUT:-150}" $PY -m tools.hf_baseline --config "$CONFIG" --batch 1 64 --input-len 128 \
    --output-len ${HF_OUTPUT_LEN:-256} --result-json "$OUT/hf.json" 2>&1 | quiet | tail -3 | tee "$LOGS/hf.txt"
fi

offline b1 "" --num-prompts 1 --input-len 128 --output-len 256
offline 512x128 "" --num-prompts 512 --input-len 128 --output-len 128
offline 256x512 "" --num-prompts 256 --input-len 128 --output-len 512
STEP_BATCHES=256 STEP_CONTEXT=384 step b256_ctx384
# Every greedy step shape compiles at start-up: this run's "new shapes" says whether any compiled while timed.
[ -n "${SKIP_MIXED:-}" ] || WARMUP_PASS= OFFLINE_TIMEOUT=${MIXED_TIMEOUT:-300} offline mixed1000 "" --num-prompts 1000 \
  --input-len 128 --input-len-max 1024 --output-len 128 --output-len-max 512 --seed 0
[ -n "${CB_FLAGS:-}" ] && STEP_BATCHES="1 256" step cb "$CB_FLAGS"

echo "== summary"
$PY - "$OUT" "$LOGS" << 'EOF'
import json, sys
from pathlib import Path
out, logs = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(out.glob("step_*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem}: HBM {r['bandwidth'] / 1e12:.2f} TB/s, matmul {r['matmul'] / 1e12:.0f} TFLOP/s; " + "; ".join(
        f"b{x['batch']} {x['step_ms']:.2f} ms ({x['ratio']:.2f} of roofline, enqueue {x['enqueue_ms']:.2f} ms)"
        for x in r["rows"]))
for f in sorted(out.glob("offline_*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem}: {r['output_throughput']:.1f} out tok/s, {r['total_token_throughput']:.1f} total tok/s, "
          f"{r['steps']} steps ({r['new_step_shapes']} new shapes, {r['steps_after_idle']} after an idle device), "
          f"{1e3 * r['duration_s'] / r['steps']:.2f} ms per step: host {r['host_ms_per_step']:.2f} "
          f"(launch thread {r['launch_ms_per_step']:.2f}) / wait {r['device_wait_ms_per_step']:.2f}")
if (out / "hf.json").exists():
    print("hf:", (logs / "hf.txt").read_text().strip().replace("\n", " | "))
EOF
