#!/usr/bin/env bash
# The weight-quantisation GPU run (issue 16) in one device call, Llama-3-8B config, weights random and
# quantised at load: the quantised matmul kernels side by side (python -m kernels.pallas.bench --quant), the
# model step per weight mode against 16-bit at batch 1 and 256 (bandwidth and matmul rate measured in the
# same run), and the offline engine per mode: batch-1 decode and 512 × (128 in / 128 out).
# MODES: the weight modes to compare (default: all the seed's schemes and fp8_w8a8). SKIP_KERNELS=1,
# SKIP_OFFLINE=1 leave parts out. JSON under $OUT (logs under $LOGS), a table last.
# Usage on the device machine (carry .whl and the tokenizer dir):  TOKENIZER_DIR=.devtmp/tok bash tools/gpu_quant_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-quant-bench
MODES=${MODES:-triton_w8a16 triton_w4a16 triton_w8a8 ppl_w8a8_mixdown fp8_w8a8}
quiet() { grep -v -E "Warning|warn\(|DeprecationWarning|it/s\]|req/s\]|shape/s\]" ; }
ENGINE=(--load_format dummy --data_type bf16 --max_total_token_num ${KV_TOKENS:-262144}
  --running_max_req_size ${MAX_RUNNING:-256} --batch_max_tokens 8192 --max_req_input_len 2048 --max_req_total_len 3072)

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null
$PY -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices()[0].device_kind)"
if [ -z "${SKIP_KERNELS:-}" ]; then
  echo "== quantised matmul kernels"
  timeout "${KERNEL_TIMEOUT:-300}" $PY -m kernels.pallas.bench --quant 2>&1 | quiet > "$LOGS/kernels.txt"
  grep "^| " "$LOGS/kernels.txt" > "$OUT/kernels.md"
fi
echo "== model step per weight mode (decode at 1024 context)"
timeout "${STEP_TIMEOUT:-600}" $PY -m jaxllm.bench.step --config "$CONFIG" --batch 1 256 --context 1024 \
  --weights 16bit $MODES --result-json "$OUT/step_weights.json" 2>&1 | quiet | tee "$LOGS/step.txt"
if [ -z "${SKIP_OFFLINE:-}" ]; then
  for mode in 16bit $MODES; do
    flags=(); [ "$mode" = 16bit ] || flags=(--mode "$mode")
    for run in "b1 --num-prompts 1 --input-len 128 --output-len 256" "512x128 --num-prompts 512 --input-len 128 --output-len 128"; do
      set -- $run; name=$1; shift
      echo "== offline $mode $name"
      timeout "${OFFLINE_TIMEOUT:-240}" $PY -m jaxllm.bench offline --model_dir "$MODEL" --warmup-pass \
        --result-json "$OUT/offline_${mode}_$name.json" "$@" "${ENGINE[@]}" "${flags[@]}" 2>&1 | quiet | tail -6 \
        | tee "$LOGS/offline_${mode}_$name.txt"
    done
  done
fi
echo "== summary"
tail -n $(( $(echo $MODES | wc -w) * 2 + 3 )) "$LOGS/step.txt"
grep -h -E "output tok/s|tokens/s" "$LOGS"/offline_* 2> /dev/null | head -40
