"""Model-step microbenchmark: jitted decode (or prefill) steps with random weights, against the roofline.

Roofline per step: max(bytes read / HBM bandwidth, FLOPs / matmul rate), bytes = weights + the KV read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import xla_options
from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache, quant
from jaxllm.models.quant import WeightQuant, with_weight_mode
from jaxllm.models.attention import AttentionMetadata
from jaxllm.models.expert_kernels import KERNELS
from jaxllm.parallel import make_mesh
from jaxllm.weights import DATA_TYPES, random_params


@dataclasses.dataclass(frozen=True)
class StepCase:
    batch: int
    context: int  # tokens already in each request's KV (decode) or prompt length (prefill)
    prefill: bool = False


def median_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `call()` with its result ready, after one untimed call (compilation, warm-up)."""
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_hbm_bandwidth(gib: float = 4.0, repeats: int = 10) -> float:
    """Bytes/s of a `jnp.sum` over `gib` GiB of bf16 (one read of every byte): how the issues quote it."""
    x = jax.random.normal(jax.random.PRNGKey(1), (int(gib * 2**30 / 2),), jnp.bfloat16)
    total = jax.jit(jnp.sum)
    return x.nbytes / median_seconds(lambda: total(x), repeats)


def measure_matmul_rate(n: int = 8192, repeats: int = 10) -> float:
    """bf16 FLOP/s of an n³ matrix product on random data."""
    a = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(3), (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / median_seconds(lambda: mm(a, b), repeats)


def _metadata(case: StepCase, num_slots: int) -> tuple[jnp.ndarray, AttentionMetadata]:
    """Each request owns a contiguous run of slots; decode adds token `context` to each."""
    rng = np.random.default_rng(0)
    per_req = case.context + 1
    rows = [list(range(r * per_req, (r + 1) * per_req)) for r in range(case.batch)]
    if case.prefill:
        chunks = [(0, case.context) for _ in range(case.batch)]
        rows = [row[: case.context] for row in rows]
    else:
        chunks = [(case.context, 1) for _ in range(case.batch)]
    meta = AttentionMetadata.for_sequences(chunks, rows, scratch_slot=num_slots, width=per_req)
    n = int(meta.positions.shape[0])
    return jnp.asarray(rng.integers(0, 1000, size=n), jnp.int32), meta


_HLO_ARRAY = re.compile(r"= (bf16|f16|f32|s8|s32)\[([\d,]+)\]\S* (copy|transpose)\(")
_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "s8": 1, "s32": 4}


def large_copies(hlo_text: str, min_bytes: int = 1 << 20) -> list[str]:
    """Copies and transposes of at least `min_bytes` in optimized HLO: weights or KV moved every step."""
    found = []
    for line in hlo_text.splitlines():
        m = _HLO_ARRAY.search(line)
        if m and _ITEMSIZE[m.group(1)] * math.prod(int(d) for d in m.group(2).split(",")) >= min_bytes:
            found.append(line.strip()[:160])
    return found


def run_case(model, params, config: ModelConfig, case: StepCase, repeats: int,
             profile_steps: int = 0) -> tuple[float, float, float]:
    """Median seconds of one jitted step waited for (KV cache donated, as in the engine), seconds a step when
    `repeats` steps are enqueued back to back before one wait (the best of three: the device's time, as the
    engine's queued steps see it, without each step's enqueue on an idle device), and the median host time the
    call takes to return (enqueueing the step's kernels); warns of large copies. `profile_steps` > 0: then
    that many steps traced, their device kernels printed (`profile_kernels`)."""
    num_slots = case.batch * (case.context + 1)
    cache = init_kv_cache(model, num_slots)
    tokens, meta = _metadata(case, num_slots)
    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c), donate_argnums=(3,))
    step = step.lower(params, tokens, meta, cache).compile()
    copies = large_copies(step.as_text())
    for line in copies[:8]:
        print(f"  large copy in batch-{case.batch} step: {line}")
    if len(copies) > 8:
        print(f"  ... {len(copies) - 8} more large copies")
    state = {"cache": cache, "enqueue": []}  # the cache is donated: each call consumes the previous one's

    def one_step():
        t0 = time.perf_counter()
        logits, state["cache"] = step(params, tokens, meta, state["cache"])
        state["enqueue"].append(time.perf_counter() - t0)
        return logits

    seconds = median_seconds(one_step, repeats)
    back_to_back = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready([one_step() for _ in range(repeats)][-1])  # each step takes the cache before it
        back_to_back.append((time.perf_counter() - t0) / repeats)
    if profile_steps:
        profile_kernels(one_step, profile_steps, step.as_text(), f"batch {case.batch}")
    return seconds, min(back_to_back), float(np.median(state["enqueue"]))


def profile_kernels(one_step: Callable[[], Any], steps: int, hlo_text: str, label: str, top: int = 25) -> None:
    """Trace `steps` calls of `one_step` (each waited for) and print the device's kernels per step with what
    each fusion computes: one step's breakdown without the engine's prefills and host around it."""
    import tempfile

    from jaxllm.bench.profile import busy_us, device_events, fusion_summaries, kernel_lines, read_trace

    directory = Path(tempfile.mkdtemp(prefix="jaxllm-step-profile-"))
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(one_step())
    events = device_events(read_trace(directory))
    if not events:
        print(f"  {label}: no device events in the trace (a CPU backend traces none)")
        return
    print(f"  {label}: device busy {busy_us(events) / steps:.0f} µs per step over {steps} traced steps")
    for line in kernel_lines(events, steps, top, fusion_summaries(hlo_text)):
        print("  " + line)


def params_read(config: ModelConfig, tokens: int) -> float:
    """Params a step over `tokens` tokens must read: all but the experts no token is routed to (their expected
    count under uniform routing; a MoE step of one token reads its top-k experts only)."""
    m = config.moe
    if m is None:
        return config.num_params
    expert = 3 * config.hidden_size * m.intermediate_size
    touched = m.num_experts * (1 - (1 - m.top_k / m.num_experts) ** tokens)
    return config.num_active_params + len(m.layers) * (touched - m.top_k) * expert


def roofline(config: ModelConfig, case: StepCase, itemsize: int, bandwidth: float, flops_rate: float,
             weight_bytes: int | None = None) -> dict:
    """Floor of one step; `weight_bytes`: the weights as stored (quantised ones smaller), default 16-bit, of
    which the step reads the share `params_read` gives (MoE: the experts its tokens are routed to)."""
    tokens = case.batch * (case.context if case.prefill else 1)
    stored = weight_bytes or config.num_params * itemsize
    weight_bytes = stored * params_read(config, tokens) / config.num_params
    kv_bytes = case.batch * case.context * config.kv_values_per_token * itemsize
    flops = 2 * config.num_active_params * tokens
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "bytes_s": (weight_bytes + kv_bytes) / bandwidth,
        "flops_s": flops / flops_rate,
        "floor_s": max((weight_bytes + kv_bytes) / bandwidth, flops / flops_rate),
    }


def _experts_kernel(ns):
    from jaxllm.bench.experts import served  # imported here: that module imports this one

    return served(ns.experts, ns.pallas_block, interpret=jax.devices()[0].platform == "cpu")


def _latent_note(config: ModelConfig, itemsize: int) -> str:
    """For latent attention: the per-token bytes of the per-head keys and values it replaces."""
    if config.mla is None:
        return ""
    full = config.per_head_kv_values_per_token * itemsize
    return f" (latent; per-head keys and values would take {full / 1024:.1f} KiB, {full / (config.kv_values_per_token * itemsize):.1f}x)"


def _modes(ns, weights: str | None) -> list[str]:
    """--mode plus one entry of --weights (16bit adds nothing)."""
    return ns.mode + ([weights] if weights not in (None, "16bit") else [])


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxllm.bench.step", description=__doc__)
    p.add_argument("--config", required=True, help="a config.json (random weights are generated)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", action="store_true", help="time prefill of --context tokens per request")
    p.add_argument("--data_type", default="bfloat16", choices=sorted(DATA_TYPES))
    p.add_argument("--mode", nargs="*", default=[],
                   help="kernel and weight-quantisation modes (as jaxllm.serve --mode; weights quantised at load)")
    p.add_argument("--weights", nargs="+", default=None, metavar="MODE",
                   help="compare weight modes in one run: 16bit and/or weight-quantisation modes (e.g. 16bit "
                        "triton_w8a16 triton_w4a16), each added to --mode; the table gives each one's speed-up")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a shorter model)")
    p.add_argument("--experts", choices=KERNELS, default="auto",
                   help="MoE models: the experts' kernel (auto: by token count, as served on GPU; or one of them)")
    p.add_argument("--pallas-block", type=lambda t: tuple(int(v) for v in t.split(",")), default=None,
                   help="the Pallas experts kernel's block_m (0: by row count),block_n,block_k,num_warps,num_stages")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing each case, trace STEPS steps and print its kernels per step (GPU)")
    p.add_argument("--result-json", default=None)
    ns = p.parse_args(argv)

    raw = json.loads(Path(ns.config).read_text())
    if ns.layers:
        raw["num_hidden_layers"] = ns.layers
    from jaxllm.models.backends import attention_backend, resolve_modes

    dtype = DATA_TYPES[ns.data_type]
    # the XLA options the engine would set for these weights (before the backend starts): one process, so every
    # mode of the run shares them
    for weights in ns.weights or [None]:
        weight_mode = resolve_modes(_modes(ns, weights)).weight_mode
        added = xla_options.for_weights(weight_mode and WeightQuant.from_mode(weight_mode, 1))
        if added:
            print(f"XLA_FLAGS += {added} (as the engine sets it for {weight_mode}; every mode of this run has it)")
    bandwidth, rate = measure_hbm_bandwidth(), measure_matmul_rate()
    print(f"device {jax.devices()[0].device_kind}: HBM read {bandwidth / 1e12:.2f} TB/s, "
          f"bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    rows = []
    for weights in ns.weights or [None]:
        modes = _modes(ns, weights)
        config = with_weight_mode(ModelConfig.from_hf_dict(raw), resolve_modes(modes).weight_mode, raw)
        backend = attention_backend(modes, jax.devices()[0].platform)
        model = build_model(config, dtype, backend, experts_kernel=_experts_kernel(ns))
        params = random_params(model, make_mesh(1), 1)
        print(f"modes {modes or '(none)'}: backend {getattr(backend, 'name', type(backend).__name__)}, "
              f"weights {quant.nbytes(params) / 1e9:.2f} GB", flush=True)
        itemsize = jnp.dtype(dtype).itemsize
        print(f"  {config.num_params / 1e9:.2f} B params ({config.num_active_params / 1e9:.2f} B active per token); "
              f"KV cache {config.kv_values_per_token * itemsize / 1024:.1f} KiB per token"
              f"{_latent_note(config, itemsize)}")
        for batch in ns.batch:
            case = StepCase(batch=batch, context=ns.context, prefill=ns.prefill)
            seconds, queued, enqueue = run_case(model, params, config, case, ns.repeats, ns.profile)
            roof = roofline(config, case, itemsize, bandwidth, rate, quant.nbytes(params))
            rows.append({"weights": weights or "as --mode", **dataclasses.asdict(case), "step_ms": seconds * 1e3,
                         "queued_ms": queued * 1e3, "floor_ms": roof["floor_s"] * 1e3,
                         "ratio": roof["floor_s"] / seconds, "queued_ratio": roof["floor_s"] / queued,
                         "tokens_per_s": batch * (ns.context if ns.prefill else 1) / seconds,
                         "enqueue_ms": enqueue * 1e3})
        del params
    if ns.result_json:
        Path(ns.result_json).write_text(json.dumps({"bandwidth": bandwidth, "matmul": rate, "rows": rows}, indent=2))
    base = {r["batch"]: r for r in rows if r["weights"] == "16bit"}
    print("step: one step waited for; queued: steps enqueued back to back (the device's time a step)")
    print(f"{'weights':>18} {'batch':>6} {'context':>8} {'step ms':>9} {'queued ms':>10} {'floor ms':>9} "
          f"{'of floor':>9} {'tok/s':>10} {'enqueue ms':>11} {'vs 16bit':>9} {'queued':>7}")
    for r in rows:
        b = base.get(r["batch"])
        speedups = [f"{b[k] / r[k]:.2f}x" if b else "-" for k in ("step_ms", "queued_ms")]
        print(f"{r['weights']:>18} {r['batch']:>6} {r['context']:>8} {r['step_ms']:>9.2f} {r['queued_ms']:>10.2f} "
              f"{r['floor_ms']:>9.2f} {r['ratio']:>9.2f} {r['tokens_per_s']:>10.0f} {r['enqueue_ms']:>11.2f} "
              f"{speedups[0]:>9} {speedups[1]:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
