#!/usr/bin/env bash
# LLaVA-1.5-7B's config with random weights (issue 19) through ONE in-process engine (--enable_multimodal):
# TTFT of one request with one new 336 px image (576 image tokens + 63 text), the same request again with its
# image cached (no encode: repeated_image_encodes 0), the CLIP tower's encode time for 1 and 16 images, and the
# throughput of 64 concurrent one-image requests (each image new, 128 output tokens, ignore_eos). JSON under $OUT.
# Usage on the device machine (carry .whl and any tokenizer dir; the benchmark sends token ids):
#   TOKENIZER_DIR=.devtmp/tok bash tools/gpu_vision_bench.sh
# Time: weights init plus the start-up set of step shapes compiled in parallel (as the server does), then the
# untimed runs compile the encoder's batch shapes (not measured yet; JAX's persistent compilation cache
# makes a rerun faster).
# Qwen2-VL-7B the same way (a 400×336 noise image is 168 image tokens at its default pixel budget):
#   CONFIG=tests/assets/configs/qwen2-vl-7b.json TOKENIZER_DIR=.devtmp/tok bash tools/gpu_vision_bench.sh
set -uo pipefail
CONFIG=${CONFIG:-tests/assets/configs/llava-1.5-7b.json}
source tools/device_env.sh /tmp/jaxllm-vision
timeout "${RUN_TIMEOUT:-300}" $PY -m jaxllm.bench.vision --model_dir "$MODEL" --concurrent 64 --text_len 64 \
    --output_len 128 --data_type bf16 --max_total_token_num 65536 --batch_max_tokens 4096 \
    --max_req_input_len 1024 --max_req_total_len 1280 --running_max_req_size 64 --cache_capacity 200 \
    2> >(grep -v -E "Warning|it/s\]" >&2) | tee "$OUT/vision_$(basename "$CONFIG" .json).json"
