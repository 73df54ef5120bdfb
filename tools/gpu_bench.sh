#!/usr/bin/env bash
# The GPU performance run (issue 8) in one device call: model-step decode against the roofline, Hugging Face
# transformers' generate as the sanity floor, and offline engine throughput. JSON under $OUT, a table last.
# Usage on the device machine (carry .whl and the tokenizer dir):  TOKENIZER_DIR=.devtmp/tok bash tools/gpu_bench.sh
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
OUT=${OUT:-/tmp/jaxllm-bench}; mkdir -p "$OUT"
CONFIG=${CONFIG:-tests/assets/configs/llama-3-8b.json}
DTYPE=${DTYPE:-bf16}
MODEL=$(mktemp -d); cp "$CONFIG" "$MODEL/config.json"; cp "$TOKENIZER_DIR"/* "$MODEL/"
quiet() { grep -v -E "Warning|warn\(|DeprecationWarning" ; }

echo "== model step (Pallas attention), decode at 1k context"
timeout "${STEP_TIMEOUT:-260}" python3 -m jaxllm.bench.step --config "$CONFIG" --batch ${STEP_BATCHES:-1 64 256} \
  --context ${STEP_CONTEXT:-1024} --repeats 20 --result-json "$OUT/step.json" 2>&1 | quiet | tee "$OUT/step.txt"

echo "== Hugging Face transformers generate (sanity floor)"
timeout "${HF_TIMEOUT:-120}" python3 -m tools.hf_baseline --config "$CONFIG" --batch 1 64 --input-len 128 \
  --output-len ${HF_OUTPUT_LEN:-256} --result-json "$OUT/hf.json" 2>&1 | quiet | tail -3 | tee "$OUT/hf.txt"

echo "== offline engine throughput, 128 in / 128 out"
timeout "${OFFLINE_TIMEOUT:-240}" python3 -m jaxllm.bench offline --model_dir "$MODEL" --warmup 0 \
  --num-prompts ${OFFLINE_PROMPTS:-512} --input-len 128 --output-len 128 --result-json "$OUT/offline.json" \
  --load_format dummy --data_type "$DTYPE" --max_total_token_num ${KV_TOKENS:-262144} \
  --running_max_req_size ${MAX_RUNNING:-256} --batch_max_tokens 8192 --max_req_total_len 3072 2>&1 | quiet \
  | tail -9 | tee "$OUT/offline.txt"

echo "== summary"
cat "$OUT/step.txt" | tail -4; cat "$OUT/hf.txt"; cat "$OUT/offline.txt"
