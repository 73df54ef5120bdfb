"""The engine thread's host time per step at large batch, per row (each phase's wall time and the thread's CPU time
in it, by the engine's counters, and the thread's whole CPU time): `rows` requests decoding together, in process
(the engine makes every row's text) and as the engine core behind the HTTP frontend (the frontend makes the text
of rows without stop strings; the core's events go to a sink that keeps them, as the core's would be sent). Any
model directory with a tokenizer (random weights: --load_format dummy); a tiny one measures the host alone:

    python -m jaxllm.bench.host --model_dir DIR [--rows 256 512] [--output-len 24] [serve flags...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from jaxllm.bench.threads import thread_cpu_s

_PHASES = ("schedule", "dispatch", "postprocess", "host")
_COUNTERS = tuple(f"{phase}{kind}_s" for phase in _PHASES for kind in ("", "_cpu"))


def host_us_per_row(args, rows: int, output_len: int, *, as_core: bool) -> dict:
    """µs per row per step of each host phase (the engine's counters: wall time, and the engine thread's CPU time
    as NAME_cpu_us_per_row), over a timed run of `rows` requests × `output_len` tokens (one prefill step, then
    decode steps) after an untimed one that compiles the shapes."""
    from jaxllm.bench.frontend import KeepLast
    from jaxllm.engine.core import CoreSink
    from jaxllm.engine.engine import Engine
    from jaxllm.engine.request import SamplingParams

    sink = CoreSink(KeepLast()) if as_core else None
    rng = np.random.default_rng(0)
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    with Engine.from_args(args, warmup=0, sink=sink) as engine:
        def run(step: int) -> None:
            requests = [(rng.integers(100, 5000, 8).tolist(), params, f"r{step}.{i}") for i in range(rows)]
            for i in range(rows if as_core else 0):
                sink.expect(f"r{step}.{i}", i)
            done = engine._counters["finished"] + rows
            engine.submit_many(requests)  # the events are kept, not read: no reader competes for the GIL
            while engine._counters["finished"] < done:  # (idle until the loop takes the submissions)
                time.sleep(0.05)
            engine.wait_idle(600)

        run(0)
        before, cpu_before = dict(engine._counters), thread_cpu_s(engine._thread.native_id)
        run(1)
        after, cpu_after = engine._counters, thread_cpu_s(engine._thread.native_id)
    steps = after["steps"] - before["steps"]
    per_row = {name.removesuffix("_s") + "_us_per_row": 1e6 * (after[name] - before[name]) / steps / rows
               for name in _COUNTERS}
    # The engine thread's own CPU time: the host's work without the waits for the GIL or a loaded machine's cores.
    per_row["engine_thread_cpu_us_per_row"] = 1e6 * (cpu_after - cpu_before) / steps / rows
    return per_row | {"steps": steps}


def main(argv: list[str] | None = None) -> int:
    from jaxllm.args import ServerArgs

    parser = argparse.ArgumentParser(prog="python -m jaxllm.bench.host", description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--output-len", type=int, default=24)
    ns, serve_flags = parser.parse_known_args(argv)
    results = {}
    for rows in ns.rows:
        args = ServerArgs.from_argv([
            "--load_format", "dummy", "--running_max_req_size", str(rows), "--max_total_token_num",
            str(rows * (16 + ns.output_len) + 1024), "--batch_max_tokens", str(max(8 * rows, 1024)),
            "--max_req_input_len", "16", "--max_req_total_len", str(16 + ns.output_len), *serve_flags])
        results[rows] = {"in_process": host_us_per_row(args, rows, ns.output_len, as_core=False),
                         "engine_core": host_us_per_row(args, rows, ns.output_len, as_core=True)}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
