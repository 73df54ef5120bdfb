"""Offline throughput: the whole workload through the in-process engine (`jaxllm.LLM`), no HTTP."""

from __future__ import annotations

import dataclasses
import threading
import time

from jaxllm.bench.stats import format_rows
from jaxllm.bench.workload import BenchRequest


class _PeakKV:
    """The most KV slots in use while a run lasts, polled from the engine's stats (what /token_load shows)."""

    def __init__(self, engine, period_s: float = 0.002):
        self.engine, self.period_s, self.peak = engine, period_s, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._done.is_set():
            self.peak = max(self.peak, self.engine.stats()["kv_used"])
            self._done.wait(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def _generate(llm, requests: list[BenchRequest], best_of: int, separately: bool) -> list[list[int]]:
    """Every request's output token ids: one sequence each (best_of 1), one group of best_of sequences sharing
    the prompt's KV, or (`separately`) best_of separate requests of the prompt (sequence i with seed i)."""
    from jaxllm import SamplingParams
    from jaxllm.engine.group import member_params
    from jaxllm.offline import _collect

    if best_of == 1:
        params = [SamplingParams(max_new_tokens=r.output_len, ignore_eos=True) for r in requests]
        return [o.token_ids for o in llm.generate([list(r.prompt_ids) for r in requests], params, use_tqdm=False)]
    engine = llm.engine
    group = [SamplingParams(best_of=best_of, n=best_of, max_new_tokens=r.output_len, ignore_eos=True,
                            do_sample=True, seed=k * best_of) for k, r in enumerate(requests)]
    if separately:
        singles = [(list(r.prompt_ids), dataclasses.replace(member_params(g, i), best_of=1, n=1), None)
                   for r, g in zip(requests, group) for i in range(best_of)]
        streams = engine.submit_many(singles)
    else:
        streams = [s for r, g in zip(requests, group) for s in engine.submit_group(list(r.prompt_ids), g)]
    return [_collect([], s).token_ids for s in streams]


def run_offline(llm, requests: list[BenchRequest], best_of: int = 1, separately: bool = False) -> dict:
    """Generate every request at once (the engine batches them); returns throughput figures and the peak KV
    use. `best_of` > 1: each prompt as a group of best_of sequences (or best_of separate requests)."""
    prompts = [list(r.prompt_ids) for r in requests]
    before = llm.engine.stats()
    shapes_before = len(llm.engine.runner.shapes_seen)
    start = time.perf_counter()
    with _PeakKV(llm.engine) as kv:
        outputs = _generate(llm, requests, best_of, separately)
    duration = time.perf_counter() - start
    llm.engine.wait_idle(timeout=10.0)
    total_in = sum(len(p) for p in prompts) * (best_of if separately else 1)
    total_out = sum(len(o) for o in outputs)
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
        "best_of": best_of,
        "separately": separately,
        "peak_kv_tokens": kv.peak,
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(outputs) / duration,  # sequences per second
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }


def format_offline_table(result: dict) -> str:
    rows = [
        ("sequences", f"{result['completed']}" + (f" (best_of {result['best_of']}, "
                                                  f"{'separate requests' if result['separately'] else 'groups'})"
                                                  if result["best_of"] > 1 else "")),
        ("peak KV in use (tokens)", str(result["peak_kv_tokens"])),
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
