"""`python -m jaxllm.bench startup`: the server's start-up, from launching `python -m jaxllm.serve` to its first
`/health` OK, cold (an empty compilation cache) then warm (the cache the cold start filled), each with the engine
core's phases (the `start-up:` lines jaxllm.engine.startup logs) and the compilations each phase built or read
from the persistent cache."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from jaxllm.child import die_with_parent
from jaxllm.engine.startup import LINE, WEIGHTS_LINE

POLL_S = 0.2
# The runner's line after the start-up compiles: each shape's seconds of lowering and of XLA (compile or cache read).
COMPILED_SHAPES_LINE = re.compile(r"compiled \d+ step shapes in (?P<threads>\d+) threads, seconds each [^:]*: "
                                  r"lower \+ compile\): (?P<each>.*)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as response:
            return response.status == 200
    except OSError:
        return False


def start_once(model_dir: str, flags: list[str], cache_dir: str, log_path: Path, timeout_s: float) -> dict:
    """Launch the server with `cache_dir` as its compilation cache, time it to the first /health OK, stop it.
    Returns {"health_s": seconds, "phases": {name: {"seconds", "compiled", "from_cache"}}}."""
    port = _free_port()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    command = [sys.executable, "-m", "jaxllm.serve", "--model_dir", model_dir, "--host", "127.0.0.1",
               "--port", str(port), *flags]
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        try:
            while not _healthy(port):
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with code {server.returncode}; its log: {log_path}")
                if time.perf_counter() - started > timeout_s:
                    raise RuntimeError(f"no /health OK within {timeout_s:.0f} s; the server's log: {log_path}")
                time.sleep(POLL_S)
            health_s = time.perf_counter() - started
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    text = log_path.read_text(errors="replace")
    phases = {}
    for match in LINE.finditer(text):
        phases[match["phase"]] = {"seconds": float(match["seconds"]), "compiled": int(match["built"]),
                                  "from_cache": int(match["read"])}
    result = {"health_s": round(health_s, 2), "phases": phases}
    compiled = COMPILED_SHAPES_LINE.search(text)
    if compiled:
        splits = [pair.split("+") for pair in re.findall(r" (\d+\.\d+\+\d+\.\d+)", compiled["each"])]
        result.update(lower_s=round(sum(float(lower) for lower, _ in splits), 2),
                      xla_compile_s=round(sum(float(xla) for _, xla in splits), 2),
                      compile_threads=int(compiled["threads"]))
    loaded = WEIGHTS_LINE.search(text)
    if loaded:
        result.update(weights_gb=float(loaded["gb"]), weights_gb_s=float(loaded["rate"]))
    return result


def run(model_dir: str, flags: list[str], runs: list[str], cache_dir: str | None, timeout_s: float) -> dict:
    """Each of `runs` ("cold": the cache directory emptied first; "warm": as the previous run left it), in order,
    in `cache_dir` (by default a temporary directory, removed after)."""
    with tempfile.TemporaryDirectory(prefix="jaxllm-startup-") as scratch:
        cache = Path(cache_dir or Path(scratch) / "cache")
        results = {}
        for i, kind in enumerate(runs):
            if kind == "cold" and cache.exists():
                _empty(cache)
            log_path = Path(scratch) / f"{i}-{kind}.log"
            results[f"{i}-{kind}" if runs.count(kind) > 1 else kind] = start_once(
                model_dir, flags, str(cache), log_path, timeout_s)
        return results


def _empty(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):  # files before their folders
        path.rmdir() if path.is_dir() else path.unlink()


def format_table(results: dict) -> str:
    names = list(dict.fromkeys(name for r in results.values() for name in r["phases"]))
    header = f"{'phase':<20}" + "".join(f"{run:>26}" for run in results)
    rows = [header, f"{'(s, compiled/cached)':<20}"]
    for name in names:
        cells = []
        for r in results.values():
            p = r["phases"].get(name)
            cells.append(f"{p['seconds']:>12.2f} s {p['compiled']:>5}/{p['from_cache']:<5}" if p else f"{'-':>26}")
        rows.append(f"{name:<20}" + "".join(cells))
    rows.append(f"{'launch to /health':<20}" + "".join(f"{r['health_s']:>12.2f} s{'':12}" for r in results.values()))
    for key, label in (("lower_s", "shapes: lowering"), ("xla_compile_s", "shapes: XLA")):
        rows.append(f"{label:<20}" + "".join(f"{r.get(key, float('nan')):>12.2f} s{'':12}" for r in results.values()))
    rows.append(f"{'weights GB/s':<20}" + "".join(f"{r.get('weights_gb_s', float('nan')):>12.2f}{'':14}"
                                                  for r in results.values()))
    return "\n".join(rows)
