"""Offline throughput: the whole workload through the in-process engine (`jaxllm.LLM`), no HTTP; for reward
models, scoring throughput against the same prompts' prefill throughput."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

from jaxllm.bench.stats import format_rows
from jaxllm.bench.threads import busiest_ms_per_step, cpu_by_thread_name
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


def _generate(llm, requests: list[BenchRequest], best_of: int, separately: bool, guided=None) -> list[list[int]]:
    """Every request's output token ids: one sequence each (best_of 1; each under the grammar `guided` if
    given), one group of best_of sequences sharing the prompt's KV, or (`separately`) best_of separate requests
    of the prompt (sequence i with seed i)."""
    from jaxllm import SamplingParams
    from jaxllm.engine.group import member_params
    from jaxllm.offline import _collect

    if best_of == 1:
        params = [SamplingParams(max_new_tokens=r.output_len, ignore_eos=True, guided=guided) for r in requests]
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


def _score(llm, requests: list[BenchRequest]) -> list[list[int]]:
    """Score every prompt on a reward model: no output tokens."""
    llm.score([list(r.prompt_ids) for r in requests], use_tqdm=False)
    return [[] for _ in requests]


def schema_grammar(path: str | None):
    """The `Guided` JSON-schema grammar in the file at `path` (None: no grammar), for --json-schema."""
    if path is None:
        return None
    from jaxllm.engine.request import Guided

    return Guided("json_schema", Path(path).read_text())


def run_offline(llm, requests: list[BenchRequest], best_of: int = 1, separately: bool = False,
                guided=None) -> dict:
    """Generate every request at once (the engine batches them), or on a reward model score every prompt;
    returns throughput figures and the peak KV use. `best_of` > 1: each prompt as a group of best_of sequences
    (or best_of separate requests). `guided`: a `Guided` grammar every answer follows (best_of 1)."""
    prompts = [list(r.prompt_ids) for r in requests]
    before = llm.engine.stats()
    shapes_before = len(llm.engine.runner.shapes_seen)
    threads_before = cpu_by_thread_name()
    start = time.perf_counter()
    with _PeakKV(llm.engine) as kv:
        outputs = _score(llm, requests) if llm.engine.scoring else _generate(llm, requests, best_of, separately, guided)
    duration = time.perf_counter() - start
    threads_after = cpu_by_thread_name()
    llm.engine.wait_idle(timeout=10.0)
    total_in = sum(len(p) for p in prompts) * (best_of if separately else 1)
    total_out = sum(len(o) for o in outputs)
    after = llm.engine.stats()
    timers = ("host", "device_wait", "schedule", "dispatch", "launch", "launch_cpu", "postprocess")
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("steps", "prefill_steps", "decode_steps",
                                                             "steps_after_idle", "steps_after_idle_after_prefill",
                                                             "steps_idle_by_enqueue",
                                                             "steps_idle_by_enqueue_after_prefill",
                                                             "constrained_steps", "mask_s",
                                                             "mask_wait_s", *(f"{t}_s" for t in timers))}
    steps = max(delta["steps"], 1)
    masks = {}
    if delta["constrained_steps"]:  # the grammar worker's fill and the engine thread's wait for it
        masks = {f"{k}_ms_per_step": 1e3 * delta[f"{k}_s"] / delta["constrained_steps"] for k in ("mask", "mask_wait")}
    return {
        "steps": delta["steps"],
        "prefill_steps": delta["prefill_steps"],  # (mixed splitfuse steps count as prefill)
        "decode_steps": delta["decode_steps"],
        "new_step_shapes": len(llm.engine.runner.shapes_seen) - shapes_before,  # compiled while timed
        "steps_after_idle": delta["steps_after_idle"],  # launched once the step before had finished
        "steps_after_idle_after_prefill": delta["steps_after_idle_after_prefill"],  # ... that step a prefill
        # the step before had finished by the end of the enqueue (an upper bound: the enqueue may have waited)
        "steps_idle_by_enqueue": delta["steps_idle_by_enqueue"],
        "steps_idle_by_enqueue_after_prefill": delta["steps_idle_by_enqueue_after_prefill"],
        # each of those launches (the latest 64): step number in the run, kind, rows, the step before's kind,
        # prepared looking ahead or not, which count took it
        "idle_launches": [{**e, "step": e["step"] - before["steps"]} for e in llm.engine.idle_launches()
                          if e["step"] >= before["steps"]],
        # the host threads' CPU: the engine's, the launch thread's and the runtime's (XLA's dispatch thread)
        "thread_cpu_ms_per_step": busiest_ms_per_step(threads_before, threads_after, steps),
        **{f"{t}_ms_per_step": 1e3 * delta[f"{t}_s"] / steps for t in timers},
        "constrained_steps": delta["constrained_steps"],
        **masks,
        "completed": len(outputs),
        "scored": llm.engine.scoring,
        "best_of": best_of,
        "separately": separately,
        "peak_kv_tokens": kv.peak,
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(outputs) / duration,  # sequences per second
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "first_outputs": outputs[:8],  # token ids, to compare runs (e.g. greedy tokens at --tp 1 and 2)
    }


def reward_variant(model_dir: str | Path, dst: Path) -> Path:
    """A copy of `model_dir`'s config (and tokenizer) as the reward model of its family, one label, for
    random weights (--load_format dummy): e.g. a Llama-3-8B config with a random one-label head."""
    from jaxllm.models.registry import reward_architecture

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("auto_map", "pad_token_id", "quantization_config")}
    raw.update(architectures=[reward_architecture(raw.get("model_type", "llama"))], id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0})
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(raw))
    for path in Path(model_dir).glob("*token*"):
        if path.is_file():
            shutil.copy(path, dst / path.name)
    return dst


def score_against_prefill(model_dir: str, requests: list[BenchRequest], *, warmup: int | None = None,
                          warmup_pass: bool = False, **flags) -> dict:
    """The prompts' prefill throughput on the causal LM of `model_dir` (one new token each, so no decode
    step), then their scoring throughput on the same config with a random one-label score head, one engine
    after the other (random weights: flags must hold load_format="dummy")."""
    from jaxllm import LLM

    if flags.get("load_format") != "dummy":
        raise ValueError("--score compares random-weight models: pass --load_format dummy")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, directory, extra in [("prefill", model_dir, {}),
                                       ("score", reward_variant(model_dir, Path(tmp)), {"use_reward_model": True})]:
            with LLM(str(directory), warmup=warmup, **flags, **extra) as llm:
                work = [dataclasses.replace(r, output_len=1) for r in requests]
                if warmup_pass:
                    run_offline(llm, work)
                runs[name] = run_offline(llm, work)
            gc.collect()  # the first engine's weights and KV leave the device before the second loads
    runs["score_over_prefill"] = runs["score"]["duration_s"] and runs["prefill"]["duration_s"] / runs["score"]["duration_s"]
    return runs


def format_score_table(runs: dict) -> str:
    rows = [(f"{name}: input throughput (tok/s)", f"{runs[name]['total_input_tokens'] / runs[name]['duration_s']:.1f}")
            for name in ("prefill", "score")]
    rows += [(f"{name}: request throughput (req/s)", f"{runs[name]['request_throughput']:.2f}")
             for name in ("prefill", "score")]
    rows.append(("scoring speed / prefill speed", f"{runs['score_over_prefill']:.3f}"))
    return format_rows(rows)


def format_offline_table(result: dict) -> str:
    rows = [
        ("scored prompts" if result.get("scored") else "sequences",
         f"{result['completed']}" + (f" (best_of {result['best_of']}, "
                                                  f"{'separate requests' if result['separately'] else 'groups'})"
                                                  if result["best_of"] > 1 else "")),
        ("peak KV in use (tokens)", str(result["peak_kv_tokens"])),
        ("duration (s)", f"{result['duration_s']:.2f}"),
        ("request throughput (req/s)", f"{result['request_throughput']:.2f}"),
        ("output throughput (tok/s)", f"{result['output_throughput']:.1f}"),
        ("total throughput (tok/s)", f"{result['total_token_throughput']:.1f}"),
        ("engine steps: prefill + decode (new shapes compiled)",
         f"{result['steps']}: {result['prefill_steps']} + {result['decode_steps']} "
         f"({result['new_step_shapes']})"),
        ("steps launched on an idle device",
         f"{result['steps_after_idle']} ({result['steps_after_idle'] / max(result['steps'], 1):.0%}); "
         f"{result['steps_after_idle_after_prefill']} right after a prefill; by the enqueue's end "
         f"{result['steps_idle_by_enqueue']}, {result['steps_idle_by_enqueue_after_prefill']} after a prefill"),
        ("host / device-wait per step (ms)", f"{result['host_ms_per_step']:.2f} / {result['device_wait_ms_per_step']:.2f}"),
        ("host: schedule / dispatch / postprocess (ms)",
         f"{result['schedule_ms_per_step']:.2f} / {result['dispatch_ms_per_step']:.2f} / "
         f"{result['postprocess_ms_per_step']:.2f}"),
        ("launch thread: transfer + step call, wall / CPU (ms)",
         f"{result['launch_ms_per_step']:.2f} / {result['launch_cpu_ms_per_step']:.2f}"),
    ]
    if result.get("idle_launches"):
        rows.append(("idle launches: step kind rows (after, ahead?, counted)",
                     "; ".join(f"{e['step']} {e['kind']} {e['rows']} ({e['after']}, "
                               f"{'ahead' if e['looked_ahead'] else 'not ahead'}, {e['counted']})"
                               for e in result["idle_launches"])))
    if result.get("thread_cpu_ms_per_step"):
        rows.append(("threads' CPU per step (ms)",
                     ", ".join(f"{name} {ms:.2f}" for name, ms in result["thread_cpu_ms_per_step"])))
    if result.get("constrained_steps"):
        rows.append(("masks / engine's wait per constrained step (ms)",
                     f"{result['mask_ms_per_step']:.2f} / {result['mask_wait_ms_per_step']:.2f}"))
    return format_rows(rows)
