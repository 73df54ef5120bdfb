"""Host time to launch one engine step at --tp 1 against --tp N: packing the step's inputs, their transfer, the
compiled step's call (wall and the calling thread's CPU time), with the device idle before each launch, and what
the call hands the runtime per device (argument leaves, host-to-device transfers). Random weights; a tiny model
with as many layers as the real one has the real one's leaves (the dispatch cost follows leaves, not sizes).
Also each launch made back to back, the device still running the one before (as the engine launches): a launch
that takes longer then than on an idle device waits for the device (`busy_*`; `device_us`: the device's time a
step over that run):

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
      python -m jaxllm.bench.dispatch --layers 32 --tp 1 2 [--config config.json [--mode triton_w8a16]] [--rows 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

from jaxllm.bench.hlo import bench_runner, shrunk_config, step_shape
from jaxllm.config import ModelConfig
from jaxllm.engine.step_inputs import DeviceStep, pack

# Llama-3-8B's head layout, shrunk: the same argument leaves, kernels and collectives per layer at 1.5 MB a layer.
TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 16, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _medians_us(call, repeats: int, before_each=None) -> tuple[float, float]:
    """Median wall and calling-thread CPU µs of `repeats` calls of `call()`, each after `before_each()` if given."""
    walls, cpus = [], []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return round(1e6 * statistics.median(walls), 1), round(1e6 * statistics.median(cpus), 1)


def _median_us(call, ready, repeats: int) -> tuple[float, float]:
    """Median wall and calling-thread CPU µs of `call()`, each after `ready()` (the device idle)."""
    return _medians_us(call, repeats, before_each=ready)


def _back_to_back_us(call, ready, repeats: int) -> tuple[float, float, float]:
    """Median wall and calling-thread CPU µs of `call()` made right after the one before (the device still busy
    with it), and the device's µs per call over the run (the calls cannot outrun it)."""
    ready()
    started = time.perf_counter()
    wall, cpu = _medians_us(call, repeats)
    ready()
    return wall, cpu, round(1e6 * (time.perf_counter() - started) / repeats, 1)


def dispatch_us(config: ModelConfig, tp: int, rows: int, dtype: str, repeats: int, mode: list[str] = ()) -> dict:
    """One decode step of `rows` rows, launched `repeats` times: µs per launch of each part."""
    runner = bench_runner(config, tp, rows, dtype, list(mode), abstract=False)
    shape = step_shape(runner, rows)
    host = runner.inputs.padding(shape)
    step = DeviceStep(shape, host, None)
    executable = runner._compile(host, shape)  # noqa: SLF001 - the step's executable, called below as _run does
    ready = lambda: jax.block_until_ready((runner.kv, runner._last_tokens))  # noqa: E731, SLF001
    words, _ = pack(host)
    on_device = jax.device_put(words, runner._replicated)  # noqa: SLF001

    def call():
        runner.kv, runner._last_tokens, *_ = executable(  # noqa: SLF001
            runner.params, runner.kv, runner._last_tokens, on_device, runner.image_slab)  # noqa: SLF001

    # The same arguments handed to an executable that computes nothing: what the call costs per argument leaf.
    kv_shardings = jax.tree.map(lambda a: a.sharding, runner.kv)
    nothing = jax.jit(lambda params, kv, last, words: (kv, last), donate_argnums=(1, 2),
                      out_shardings=(kv_shardings, runner._replicated)).lower(  # noqa: SLF001
        runner.params, runner.kv, runner._last_tokens, on_device).compile()  # noqa: SLF001

    def call_nothing():
        runner.kv, runner._last_tokens = nothing(runner.params, runner.kv, runner._last_tokens, on_device)  # noqa: SLF001

    runner.execute(step)
    leaves = len(jax.tree.leaves((runner.params, runner.kv, runner._last_tokens, on_device)))  # noqa: SLF001
    launch = _median_us(lambda: runner.execute(step), ready, repeats)
    busy_launch = _back_to_back_us(lambda: runner.execute(step), ready, repeats)
    busy_call = _back_to_back_us(call, ready, repeats)
    return {
        "tp": tp, "rows": rows, "layers": config.num_layers, "argument_leaves": leaves,
        "device_buffers_per_call": leaves * tp, "transfers_per_step": tp,  # one packed buffer to each device
        "launch_us": launch[0], "launch_thread_cpu_us": launch[1],
        "pack_us": _median_us(lambda: pack(host), ready, repeats)[0],
        "transfer_us": _median_us(lambda: jax.device_put(words, runner._replicated), ready, repeats)[0],  # noqa: SLF001
        **dict(zip(("call_us", "call_thread_cpu_us"), _median_us(call, ready, repeats))),
        **dict(zip(("arguments_only_us", "arguments_only_thread_cpu_us"), _median_us(call_nothing, ready, repeats))),
        **dict(zip(("busy_launch_us", "busy_launch_thread_cpu_us", "device_us"), busy_launch)),
        **dict(zip(("busy_call_us", "busy_call_thread_cpu_us"), busy_call[:2])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxllm.bench.dispatch", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="a Hugging Face config.json (default: a tiny model with Llama-3-8B's heads)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--mode", nargs="*", default=[], help="weight modes (with --config), as the server's --mode")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rows", type=int, default=1, help="decode rows")
    p.add_argument("--data_type", default="bf16")
    p.add_argument("--repeats", type=int, default=200)
    ns = p.parse_args(argv)
    if ns.mode and not ns.config:
        p.error("--mode needs --config")
    config = (shrunk_config(ns.config, ns.layers, ns.mode) if ns.config
              else ModelConfig.from_hf_dict({**TINY, "num_hidden_layers": ns.layers}))
    results = [dispatch_us(config, tp, ns.rows, ns.data_type, ns.repeats, ns.mode) for tp in ns.tp]
    json.dump({"device": jax.devices()[0].device_kind, "results": results}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
