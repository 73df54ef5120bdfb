"""Offline throughput: the whole workload through the in-process engine (`jaxllm.LLM`), no HTTP."""

from __future__ import annotations

import time

from jaxllm.bench.stats import format_rows
from jaxllm.bench.workload import BenchRequest


def run_offline(llm, requests: list[BenchRequest]) -> dict:
    """Generate every request at once (the engine batches them); returns throughput figures."""
    from jaxllm import SamplingParams

    prompts = [list(r.prompt_ids) for r in requests]
    params = [SamplingParams(max_new_tokens=r.output_len, ignore_eos=True) for r in requests]
    before = llm.engine.stats()
    shapes_before = len(llm.engine.runner.shapes_seen)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    duration = time.perf_counter() - start
    llm.engine.wait_idle(timeout=10.0)
    total_in = sum(len(p) for p in prompts)
    total_out = sum(len(o.token_ids) for o in outputs)
    after = llm.engine.stats()
    timers = ("host", "device_wait", "schedule", "dispatch", "launch", "postprocess")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("steps", "steps_after_idle", *(f"{t}_s" for t in timers))}
    steps = max(delta["steps"], 1)
    return {
        "steps": delta["steps"],
        "new_step_shapes": len(llm.engine.runner.shapes_seen) - shapes_before,  # compiled while timed
        "steps_after_idle": delta["steps_after_idle"],  # launched once the step before had finished
        **{f"{t}_ms_per_step": 1e3 * delta[f"{t}_s"] / steps for t in timers},
        "completed": len(outputs),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(outputs) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }


def format_offline_table(result: dict) -> str:
    rows = [
        ("requests", str(result["completed"])),
        ("duration (s)", f"{result['duration_s']:.2f}"),
        ("request throughput (req/s)", f"{result['request_throughput']:.2f}"),
        ("output throughput (tok/s)", f"{result['output_throughput']:.1f}"),
        ("total throughput (tok/s)", f"{result['total_token_throughput']:.1f}"),
        ("engine steps (new shapes compiled)", f"{result['steps']} ({result['new_step_shapes']})"),
        ("steps launched on an idle device", f"{result['steps_after_idle']} ({result['steps_after_idle'] / max(result['steps'], 1):.0%})"),
        ("host / device-wait per step (ms)", f"{result['host_ms_per_step']:.2f} / {result['device_wait_ms_per_step']:.2f}"),
        ("host: schedule / dispatch / postprocess (ms)",
         f"{result['schedule_ms_per_step']:.2f} / {result['dispatch_ms_per_step']:.2f} / "
         f"{result['postprocess_ms_per_step']:.2f}"),
        ("launch thread: transfer + step call (ms)", f"{result['launch_ms_per_step']:.2f}"),
    ]
    return format_rows(rows)
