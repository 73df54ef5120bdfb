#!/usr/bin/env bash
# Issue 16's open speed goals as device profiles, one device call: where each weight mode's step spends its
# device time (`python -m jaxllm.bench.profile --fusions`: kernels by time, each XLA fusion with the operations it
# computes and their JAX sources), Llama-3-8B config, random weights quantised at load. RUNS picks (default all,
# about 90 s each on an H200 with a cold compilation cache):
#   b1_16bit b1_w8a16 b1_w4a16   batch-1 decode (one 128-token prompt, 64 new tokens)
#   b256_16bit b256_w8a8 b256_fp8  decode at 256 rows (256 prompts of 128 tokens, 16 new tokens each)
# Each profile's full table goes to $OUT/profile_RUN.txt; the head of each is printed.
# Usage on the device machine (carry .whl and the tokenizer dir):  TOKENIZER_DIR=DIR bash tools/gpu_profile_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-profile-bench
RUNS=${RUNS:-b1_16bit b1_w8a16 b1_w4a16 b256_16bit b256_w8a8 b256_fp8}
SMALL=(--max_total_token_num 16384 --running_max_req_size 4 --batch_max_tokens 512 --max_req_input_len 256
  --max_req_total_len 512)
LARGE=(--max_total_token_num 140000 --running_max_req_size 256 --batch_max_tokens 8192 --max_req_input_len 256
  --max_req_total_len 512)
declare -A MODE=([16bit]="" [w8a16]="--mode triton_w8a16" [w4a16]="--mode triton_w4a16" [w8a8]="--mode triton_w8a8"
  [fp8]="--mode fp8_w8a8")
for run in $RUNS; do
  batch=${run%%_*}; weights=${run#*_}
  if [ "$batch" = b1 ]; then work=(--prompts 1 --output-len 64 "${SMALL[@]}"); else work=(--prompts 256 --output-len 16 "${LARGE[@]}"); fi
  echo "== $run"
  timeout ${PROFILE_TIMEOUT:-240} $PY -m jaxllm.bench.profile --model_dir "$MODEL" --input-len 128 --top 40 --fusions \
    "${work[@]}" --load_format dummy --data_type bf16 ${MODE[$weights]} 2>&1 \
    | grep -v -E "Warning|warn\(|it/s\]|shape/s\]" > "$OUT/profile_$run.txt"
  grep -E "steps, wall|idle stretches" "$OUT/profile_$run.txt"; sed -n '/calls\/step/,+12p' "$OUT/profile_$run.txt" | cut -c1-200
done
