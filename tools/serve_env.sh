# Sourced by the GPU serving scripts (tools/gpu_serve_bench.sh, tools/gpu_constrain_bench.sh) after
# tools/device_env.sh: one `jaxllm.serve` at a time on $URL with SERVER_FLAGS, and `jaxllm.bench serve` runs
# against it. STARTUP_FILE collects "LABEL start-up S s" lines; START_TIMEOUT bounds a start-up (s);
# BENCH_TIMEOUT one bench run (s); CLIENT_PROCESSES the client processes of each run (default 1: one event loop
# reading every stream). Bench runs named warmup* or *_first are untimed: their JSON goes to $LOGS.
STARTUP_FILE=${STARTUP_FILE:-$LOGS/startup.txt}
SERVER_PID=

http_get() { $PY -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen('$URL' + sys.argv[1], timeout=5).read().decode())" "$1"; }
start_server() {  # start_server LABEL [extra flags]
  local label=$1; shift
  local t0; t0=$(date +%s.%N)
  $PY -m jaxllm.serve "${SERVER_FLAGS[@]}" "$@" > "$LOGS/server_$label.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 $((2 * ${START_TIMEOUT:-600}))); do
    if http_get /health > /dev/null 2>&1; then
      echo "$label start-up $($PY -c "import time; print(f'{time.time() - $t0:.1f}')") s" | tee -a "$STARTUP_FILE"
      return 0
    fi
    kill -0 $SERVER_PID 2> /dev/null || { echo "$label: server exited"; tail -20 "$LOGS/server_$label.log"; return 1; }
    sleep 0.5
  done
  echo "$label: no /health after ${START_TIMEOUT:-600} s"; return 1
}
wait_background_compiles() {  # wait_background_compiles LABEL: until the engine core has compiled the step shapes it
  # builds after /health (once idle for 10 s, in the background: jaxllm/engine/runner.py compile_later), so that a
  # timed run shares neither the device nor the host with them (an in-process run compiles before its timing);
  # at most COMPILE_WAIT s (default 300)
  local log=$LOGS/server_$1.log t0=$SECONDS
  until grep -q "step shapes after start-up" "$log"; do
    if (( SECONDS - t0 > ${COMPILE_WAIT:-300} )); then echo "$1: background compiles still running"; return 1; fi
    sleep 1
  done
  echo "$1: $(grep -o "compiled [0-9]* step shapes after start-up in [0-9.]* s" "$log" | tail -1), waited $((SECONDS - t0)) s"
}
stop_server() { [ -n "$SERVER_PID" ] && kill $SERVER_PID && wait $SERVER_PID 2> /dev/null; SERVER_PID=; }
trap stop_server EXIT
bench() {  # bench NAME [bench flags]: one `jaxllm.bench serve` run, its table kept in $LOGS/NAME.txt
  local name=$1; shift
  local results=$OUT
  case $name in warmup* | *_first) results=$LOGS ;; esac
  timeout ${BENCH_TIMEOUT:-300} $PY -m jaxllm.bench serve --base-url "$URL" --tokenizer "$MODEL" \
    --client-processes ${CLIENT_PROCESSES:-1} --result-json "$results/$name.json" "$@" 2> /dev/null > "$LOGS/$name.txt"
  echo "== $name"; grep -E "throughput|TTFT|TPOT|ITL|completed|failed" "$LOGS/$name.txt"
}
