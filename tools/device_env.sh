# Sourced by the GPU run scripts (tools/gpu_bench.sh, tools/gpu_serve_bench.sh): installs the carried wheels (.whl,
# from `bash ../shared/tools/device-wheels.sh llguidance orjson uvicorn uvloop httptools click h11`) that the device
# image lacks, sets the Python environment, and makes $MODEL: a model directory with $CONFIG's config.json and the
# tokenizer files of $TOKENIZER_DIR (weights come from --load_format dummy). NO_WHEELS=1 skips the install (a machine
# that has the packages); PY picks the interpreter; OUT the results folder (the default given as the first argument):
# it holds result files only, as the device returns at most 8 files; logs and printed tables go to LOGS.
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
OUT=${OUT:-$1}; mkdir -p "$OUT"
LOGS=${LOGS:-/tmp/jaxllm-logs}; mkdir -p "$LOGS"
CONFIG=${CONFIG:-tests/assets/configs/llama-3-8b.json}
MODEL=$(mktemp -d); cp "$CONFIG" "$MODEL/config.json"; cp "$TOKENIZER_DIR"/* "$MODEL/"
