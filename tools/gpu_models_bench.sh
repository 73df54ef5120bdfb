#!/usr/bin/env bash
# Models and weight modes side by side on one GPU, in one device call: for each "NAME CONFIG [jaxllm.serve flags]"
# argument, `python -m jaxllm.bench.models` (random weights) gives batch-1 decode against the bandwidth floor and
# 512 × (128 / 128) against the compute roofline. PAR processes at a time share the GPU: their start-ups
# (random init, compilation) overlap, their timed parts take turns under one lock. JSON per run under $OUT,
# logs under $LOGS, the one-line summaries last.
# Usage (carry .whl and the tokenizer dir):
#   TOKENIZER_DIR=.devtmp/tok PAR=2 bash tools/gpu_models_bench.sh "llama tests/assets/configs/llama-3-8b.json" \
#     "llama_w8a16 tests/assets/configs/llama-3-8b.json --mode triton_w8a16" ...
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-models
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PAR=${PAR:-2}
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.92 / $PAR, 2))")
LOCK=$(mktemp)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null

run_one() {  # run_one NAME CONFIG [flags]
  local name=$1 config=$2; shift 2
  local dir; dir=$(mktemp -d)
  cp "$config" "$dir/config.json"; cp "$TOKENIZER_DIR"/* "$dir/"
  # SIGABRT at the limit: faulthandler prints every thread's stack, so a cut run's log says where it was
  PYTHONFAULTHANDLER=1 timeout -s ABRT -k 10 "${RUN_TIMEOUT:-540}" $PY -m jaxllm.bench.models --model_dir "$dir" --lock "$LOCK" \
    --result-json "$OUT/$name.json" --load_format dummy --data_type bf16 --max_total_token_num "${KV_TOKENS:-140000}" \
    --running_max_req_size 512 --batch_max_tokens 8192 --max_req_input_len 2048 --max_req_total_len 3072 "$@" \
    > "$LOGS/$name.txt" 2>&1
  echo "$name (rc $?): $(tail -1 "$LOGS/$name.txt")" >> "$LOGS/summary.txt"
}
: > "$LOGS/summary.txt"
for spec in "$@"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 1; done
  # shellcheck disable=SC2086
  run_one $spec &
  sleep 2
done
wait
for f in "$LOGS"/*.txt; do grep -h -E "Error|error:" "$f" | tail -2 | sed "s|^|$(basename "$f"): |"; done
echo "== summary"; cat "$LOGS/summary.txt"
