#!/usr/bin/env bash
# Tensor parallelism on nvidia-h200-x2 (issue 20), in one device call: Llama-3-8B (random bf16 weights) through
# `python -m jaxllm.bench.models` (batch-1 decode, then 512 × (128 in / 128 out)) at --tp 1, --tp 2 in one process,
# --tp 2 as two processes (--nccl_port), and both --tp 2 deployments again with XLA's one-shot all-reduce kernel
# (XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true); runs named *_cbcoll record the all-reduces
# into XLA's command buffers (--xla_gpu_enable_command_buffer=+COLLECTIVES: without it the step is launched as one
# command buffer per stretch between two all-reduces, 2 per layer); a run whose flag this XLA refuses is skipped.
# Then the greedy tokens of every run against --tp 1's, the collectives and large copies of the tp-2 step's
# optimised HLO (`python -m jaxllm.bench.hlo`, 2 layers), and the host time of one step's launch at tp 1 and tp 2
# (`python -m jaxllm.bench.dispatch`, 32 layers of a small model with Llama-3-8B's heads: the same kernels,
# collectives and argument leaves; with and without the collectives in command buffers) into dispatch.txt.
# NVLink multicast stays off (exported: the follower processes inherit it).
# PAR runs at a time share the GPUs: their start-ups (random init, compiling the start-up set) overlap, their timed
# parts take turns under one lock. JSON per run under $OUT, logs under $LOGS, the summary last.
# Usage (carry .whl and the tokenizer dir):  TOKENIZER_DIR=.devtmp/tok bash tools/gpu_tp_bench.sh
#   RUNS="tp1 tp2 tp2_mp tp2_cbcoll" picks runs (default: the first five of tp1 tp2 tp2_mp tp2_oneshot
#   tp2_mp_oneshot tp2_cbcoll tp2_mp_cbcoll; the first run listed is the greedy reference when tp1 is not among
#   them); PAR runs at a time (default 1: another run's start-up on the same host slowed a measured run by up to
#   30 % in session 4, docs/perf.md); HLO=0 skips the HLO collectives, DISPATCH=0 the launch timing.
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-tp
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PAR=${PAR:-1}
RUNS=${RUNS:-"tp1 tp2 tp2_mp tp2_oneshot tp2_mp_oneshot"}
ONE_SHOT="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
CB_COLLECTIVES="--xla_gpu_enable_command_buffer=+COLLECTIVES"
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $PAR, 2))")
LOCK=$(mktemp)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null
$PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
for variant in oneshot:"$ONE_SHOT" cbcoll:"$CB_COLLECTIVES"; do
  if ! XLA_FLAGS="${variant#*:}" $PY -c "import jax; jax.devices()" > "$LOGS/${variant%%:*}_flag.txt" 2>&1; then
    echo "XLA refuses ${variant#*:}: the ${variant%%:*} runs are skipped"; tail -3 "$LOGS/${variant%%:*}_flag.txt"
    RUNS=$(echo "$RUNS" | tr ' ' '\n' | grep -v "${variant%%:*}" | tr '\n' ' ')
    [ "${variant%%:*}" = cbcoll ] && CB_COLLECTIVES=""
  fi
done

flags_of() {  # the run's jaxllm.serve flags
  case $1 in
    tp1) echo "--tp 1" ;;
    tp2|tp2_oneshot|tp2_cbcoll) echo "--tp 2" ;;
    tp2_mp) echo "--tp 2 --nccl_port 28765" ;;  # distinct ports: the two-process runs may overlap
    tp2_mp_oneshot) echo "--tp 2 --nccl_port 28766" ;;
    tp2_mp_cbcoll) echo "--tp 2 --nccl_port 28767" ;;
  esac
}

run_one() {  # run_one NAME
  local name=$1 xla=""
  [[ $name == *oneshot ]] && xla=$ONE_SHOT
  [[ $name == *cbcoll ]] && xla=$CB_COLLECTIVES
  # shellcheck disable=SC2046
  XLA_FLAGS="$xla" timeout "${RUN_TIMEOUT:-420}" $PY -m jaxllm.bench.models --model_dir "$MODEL" --lock "$LOCK" \
    --result-json "$OUT/$name.json" --load_format dummy --data_type bf16 --max_total_token_num 140000 \
    --running_max_req_size 512 --batch_max_tokens 8192 --max_req_input_len 2048 --max_req_total_len 3072 \
    $(flags_of "$name") > "$LOGS/$name.txt" 2>&1
  echo "$name (rc $?): $(tail -1 "$LOGS/$name.txt")" >> "$LOGS/summary.txt"
}

: > "$LOGS/summary.txt"
for name in $RUNS; do
  while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 1; done
  run_one "$name" &
  sleep 2
done
# Collectives of the tp-2 step (compiled only, abstract weights) while the last runs finish.
# Besides bf16 at 1 and 64 rows: int8 KV and int8 weights at one row (on the CPU, int8 KV copied each K/V buffer 4
# times per layer at one row, at tp 1 too: is that the GPU's as well?).
[ "${HLO:-1}" = 1 ] && for case in "1" "64" "1 --mode triton_int8kv" "1 --mode triton_w8a16"; do
  name=$(echo "$case" | tr -d ' -')
  # shellcheck disable=SC2086
  timeout 120 $PY -m jaxllm.bench.hlo --config "$CONFIG" --layers 2 --tp 2 --rows $case \
    --dump "$LOGS/tp2_$name.hlo" >> "$OUT/hlo.txt" 2> "$LOGS/hlo_$name.txt" || tail -3 "$LOGS/hlo_$name.txt"
done
wait
# Host time of a step's launch at tp 1 and tp 2 (the device idle before each; after the runs, alone on the GPUs),
# with the default command buffers and with the collectives recorded in them.
[ "${DISPATCH:-1}" = 1 ] && for xla in "" $CB_COLLECTIVES; do
  echo "== XLA_FLAGS=$xla" >> "$OUT/dispatch.txt"
  XLA_FLAGS="$xla" timeout 300 $PY -m jaxllm.bench.dispatch --layers 32 --tp 1 2 --repeats 100 >> "$OUT/dispatch.txt" \
    2> "$LOGS/dispatch.txt" || tail -3 "$LOGS/dispatch.txt"
done
for f in "$LOGS"/tp*.txt; do grep -h -E "Error|error:" "$f" | tail -2 | sed "s|^|$(basename "$f"): |"; done
[ -f "$OUT/hlo.txt" ] && echo "== collectives of the tp-2 step (2 layers; bf16 model)" && cat "$OUT/hlo.txt"
[ -f "$OUT/dispatch.txt" ] && echo "== host time of a step's launch (µs)" && cat "$OUT/dispatch.txt"
echo "== greedy tokens against tp1 or the first run (b1: 256 tokens of one request; offline: the first 8 of 512)"
$PY - "$OUT" $RUNS <<'EOF'
import json, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), sys.argv[2:]
results = {r: json.loads((out / f"{r}.json").read_text()) for r in runs if (out / f"{r}.json").exists()}
base_name = "tp1" if "tp1" in results else next(iter(results), None)
for name, r in results.items():
    if name == base_name:
        continue
    base = results[base_name]
    for part in ("b1", "offline"):
        ours, theirs = r[part]["first_outputs"], base[part]["first_outputs"]
        same = sum(a == b for a, b in zip(ours, theirs))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(ours, theirs)]
        print(f"{name} {part}: {same}/{len(theirs)} sequences identical to {base_name}; first differing position "
              f"{first_diff}")
for name, r in results.items():
    b, o = r["b1"], r["offline"]
    print(f"{name}: b1 {1e3 / b['ms_per_token']:.1f} tok/s (device wait {b['device_wait_ms_per_step']:.2f} ms, host "
          f"{b['host_ms_per_step']:.2f} ms, dispatch {b['dispatch_ms_per_step']:.2f} ms per step) | 512x128/128 "
          f"{o['output_throughput']:.0f} out tok/s (device wait {o['device_wait_ms_per_step']:.2f}, host "
          f"{o['host_ms_per_step']:.2f}, dispatch {o['dispatch_ms_per_step']:.2f} ms per step)")
EOF
echo "== summary"; cat "$LOGS/summary.txt"
