#!/usr/bin/env bash
# Sequence groups on the GPU (issue 14), four offline runs of the Llama-3-8B config with random weights:
# the KV held by best_of 8 on one 1,000-token prompt (a group: the prompt once plus 8 outputs) against 8 separate
# requests of it (peak_kv_tokens: the engine's KV in use, what /token_load's current_load × max_total_token_num
# shows), and output tok/s of 64 prompts × n = 8 against 512 separate requests of the same prompts. Every run
# samples (seeded) with ignore_eos. JSON under $OUT (logs under $LOGS), a table last.
# Usage on the device machine (carry .whl and the tokenizer dir):  TOKENIZER_DIR=.devtmp/tok bash tools/gpu_groups_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-groups
ENGINE=(--load_format dummy --data_type "${DTYPE:-bf16}" --max_total_token_num ${KV_TOKENS:-262144}
  --running_max_req_size 512 --batch_max_tokens 8192 --max_req_input_len 2048 --max_req_total_len 3072)

run() {  # run NAME [bench flags]: one offline benchmark, its workload run once untimed first
  local name=$1; shift
  echo "== $name: $*"
  timeout "${RUN_TIMEOUT:-420}" $PY -m jaxllm.bench offline --model_dir "$MODEL" --warmup-pass \
    --result-json "$OUT/groups_$name.json" "$@" "${ENGINE[@]}" 2>&1 | grep -v -E "Warning|it/s\]" | tail -13 \
    | tee "$LOGS/groups_$name.txt"
}

run kv_group --num-prompts 1 --input-len 1000 --output-len 256 --best-of 8
run kv_separate --num-prompts 1 --input-len 1000 --output-len 256 --best-of 8 --separately
run tput_group --num-prompts 64 --input-len 512 --output-len 256 --best-of 8
run tput_separate --num-prompts 64 --input-len 512 --output-len 256 --best-of 8 --separately

echo "== summary"
$PY - "$OUT" << 'PYEOF'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("groups_*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem}: {r['completed']} sequences, peak KV {r['peak_kv_tokens']} tokens, "
          f"{r['output_throughput']:.1f} out tok/s, {r['steps']} steps ({r['new_step_shapes']} new shapes)")
PYEOF
