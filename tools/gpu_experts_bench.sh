#!/usr/bin/env bash
# MoE experts on the H200s (issue 18), one device call per stage (each within the 10-minute limit):
#   STAGE=kernels (one GPU): `python -m jaxllm.bench.experts` per kernel (auto, ragged_dot, pallas, sliced), one
#     process each, at 1, 8, 64, 512 and 8,192 tokens: the auto column says which kernel the token count chose,
#     the others whether it chose the fastest (jaxllm/models/expert_kernels.py's thresholds).
#   STAGE=placements (nvidia-h200-x2): the served kernels at --tp 2 with the experts split and placed per device,
#     then the collectives and large copies of a 2-layer tp-2 step's optimised HLO in both placements.
# CONFIGS: the MoE configs (default Mixtral-8x7B and DeepSeek-V2-Lite); TOKENS overrides the token counts.
# The whole-model runs go through tools/gpu_models_bench.sh, the placement from the environment it inherits:
#   JAXLLM_EXPERT_PLACEMENT=per_device bash tools/gpu_models_bench.sh "mixtral_tp2_per_device CONFIG --tp 2"
# Usage (carry .whl):  STAGE=kernels bash tools/gpu_experts_bench.sh
set -uo pipefail
TOKENIZER_DIR=${TOKENIZER_DIR:-$(mktemp -d)}  # device_env.sh copies it; bench.experts needs no tokenizer
source tools/device_env.sh /tmp/jaxllm-experts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STAGE=${STAGE:-kernels}
CONFIGS=${CONFIGS:-"tests/assets/configs/mixtral-8x7b.json tests/assets/configs/deepseek-v2-lite.json"}
TOKENS=${TOKENS:-"1 8 64 512 8192"}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null
$PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"

experts() {  # experts NAME CONFIG [bench.experts flags]: one process, its table into the log
  local name=$1 config=$2; shift 2
  # shellcheck disable=SC2086
  timeout "${RUN_TIMEOUT:-240}" $PY -m jaxllm.bench.experts --config "$config" --tokens $TOKENS \
    --result-json "$OUT/$name.json" "$@" > "$LOGS/$name.txt" 2>&1
  echo "== $name (rc $?)"; grep -v -E "Warning|warn\(" "$LOGS/$name.txt" | tail -12
}

for config in $CONFIGS; do
  model=$(basename "$config" .json)
  case $STAGE in
    kernels)
      for impl in auto ragged_dot pallas sliced; do experts "${model}_$impl" "$config" --impl "$impl"; done ;;
    placements)
      for placement in split per_device; do
        experts "${model}_tp2_$placement" "$config" --tp 2 --placement "$placement" --impl auto ragged_dot pallas
        for rows in 1 64; do
          echo "== HLO of ${model}, experts $placement, $rows rows"
          JAXLLM_EXPERT_PLACEMENT=$placement timeout 300 $PY -m jaxllm.bench.hlo --config "$config" --layers 2 \
            --tp 2 --rows "$rows" 2>&1 | grep -v -E "Warning|warn\(" | tail -20
        done
      done ;;
    *) echo "STAGE is kernels or placements, not $STAGE"; exit 2 ;;
  esac
done
