#!/usr/bin/env bash
# Sequence groups on the GPU (issue 14), the Llama-3-8B config with random weights, four workloads through ONE
# in-process engine (each run twice untimed first): the KV held by best_of 8 on one 1,000-token prompt (a group:
# the prompt once plus 8 outputs) against 8 separate requests of it (peak_kv_tokens: the engine's KV in use,
# what /token_load's current_load × max_total_token_num shows), and output tok/s of 64 prompts × n = 8 against
# 512 separate requests of the same prompts. Every run samples (seeded) with ignore_eos. JSON under $OUT, a table last.
# Usage on the device machine (carry .whl and the tokenizer dir):  TOKENIZER_DIR=.devtmp/tok bash tools/gpu_groups_bench.sh
set -uo pipefail
source tools/device_env.sh /tmp/jaxllm-groups
timeout "${RUN_TIMEOUT:-420}" $PY - "$MODEL" "$OUT" "${KV_TOKENS:-262144}" << 'PYEOF' 2>&1 | grep -v -E "Warning|it/s\]" | tee "$LOGS/groups.txt"
import json, sys
from pathlib import Path
from jaxllm import LLM
from jaxllm.bench.offline import run_offline
from jaxllm.bench.workload import WorkloadSpec, build_workload

model, out, kv_tokens = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
flags = dict(load_format="dummy", data_type="bf16", max_total_token_num=kv_tokens, running_max_req_size=512,
             batch_max_tokens=8192, max_req_input_len=2048, max_req_total_len=3072)
runs = {"kv": WorkloadSpec(num_prompts=1, input_len=1000, output_len=256),
        "tput": WorkloadSpec(num_prompts=64, input_len=512, output_len=256)}
with LLM(model, warmup=0, **flags) as llm:
    for name, spec in runs.items():
        requests = list(build_workload(spec))
        for separately in (False, True):
            for _ in range(2):  # untimed: compiles the shapes it meets (step shapes vary a little from run to run)
                run_offline(llm, requests, 8, separately)
            r = run_offline(llm, requests, 8, separately)
            label = f"groups_{name}_{'separate' if separately else 'group'}"
            (out / f"{label}.json").write_text(json.dumps(r, indent=2))
            print(f"{label}: {r['completed']} sequences, peak KV {r['peak_kv_tokens']} tokens, "
                  f"{r['output_throughput']:.1f} out tok/s, {r['steps']} steps ({r['new_step_shapes']} new shapes), "
                  f"host/device-wait {r['host_ms_per_step']:.2f}/{r['device_wait_ms_per_step']:.2f} ms/step", flush=True)
PYEOF
