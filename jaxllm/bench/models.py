"""One engine, two workloads, against the run's own limits: batch-1 decode against the bandwidth floor of the
bytes each token reads, and 512 × (128 in / 128 out) against the compute roofline (2 × params FLOPs a token; MoE: the active params).

`python -m jaxllm.bench.models --model_dir DIR [jaxllm.serve flags] --result-json F` (random weights:
`--load_format dummy`). One process builds the engine once for both workloads (start-up dominates a GPU run).
It also records the KV cache's bytes per token and, for latent attention, those of a per-head cache of the same
model. MoE under --tp: `JAXLLM_EXPERT_PLACEMENT=per_device` places whole experts per device (default split).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.bench.offline import run_offline
from jaxllm.bench.step import measure_hbm_bandwidth, measure_matmul_rate
from jaxllm.bench.workload import WorkloadSpec, build_workload
from jaxllm.models import kv_bytes_per_token


def decode_bytes_per_token(params, config, context: int, kv_bytes_per_token: float | None = None) -> float:
    """Bytes one batch-1 decode step reads: every stored weight byte (quantised leaves at their stored size)
    except the untied embedding table, of which one row is read, and except the experts the token is not
    routed to (MoE: top_k of each layer's experts are read), plus the KV cache at `context` tokens
    (`kv_bytes_per_token` each; default 16-bit values)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(leaf.nbytes for _, leaf in leaves)
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        if not config.tie_word_embeddings and "embed" in name and leaf.shape and leaf.shape[0] == config.vocab_size:
            total -= leaf.nbytes
        if config.moe is not None and "experts_" in name:  # [experts, ...] stacked expert weights
            total -= leaf.nbytes * (1 - config.moe.top_k / config.moe.num_experts)
    if kv_bytes_per_token is None:
        kv_bytes_per_token = config.kv_values_per_token * 2
    return float(total + kv_bytes_per_token * context)


def kv_cache_report(model) -> dict:
    """The KV bytes per token of `model`'s cache and, for latent attention, of a cache of every head's keys
    and values in the model's dtype (layers × heads × (key + value dims) × bytes)."""
    report = {"kv_bytes_per_token": kv_bytes_per_token(model)}
    config = model.config
    if config.mla is not None:
        report["per_head_kv_bytes_per_token"] = config.per_head_kv_values_per_token * jnp.dtype(model.dtype).itemsize
    return report


def format_kv(report: dict) -> str:
    text = f"KV {report['kv_bytes_per_token'] / 1024:.1f} KiB/token"
    per_head = report.get("per_head_kv_bytes_per_token")
    if per_head is not None:
        text += (f" (latent; a per-head cache {per_head / 1024:.1f} KiB/token, "
                 f"{per_head / report['kv_bytes_per_token']:.1f}x)")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)  # --mode is not --model_dir
    p.add_argument("--model_dir", required=True)
    p.add_argument("--result-json", required=True)
    p.add_argument("--b1-output-len", type=int, default=256)
    p.add_argument("--offline-prompts", type=int, default=512)
    p.add_argument("--lock", default=None,
                   help="a file locked around the timed part, so that several processes can share one GPU: "
                        "their start-ups overlap, their measurements do not")
    p.add_argument("--warmup", type=int, default=None,
                   help="start-up shapes to compile (default: the engine's start-up set); the untimed pass "
                        "compiles the rest a workload meets")
    p.add_argument("--bandwidth-gib", type=float, default=4.0, help="size of the bandwidth probe")
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the matmul-rate probe")
    ns, extra = p.parse_known_args(argv)

    from jaxllm import LLM
    from jaxllm.bench.__main__ import _engine_overrides

    started = time.perf_counter()
    llm = LLM(ns.model_dir, warmup=ns.warmup, **_engine_overrides(extra))
    _progress(f"engine built in {time.perf_counter() - started:.1f} s")
    with _exclusive(ns.lock):
        result = _measure(llm, ns, extra)
    llm.close()
    with open(ns.result_json, "w") as f:
        json.dump(result, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    b, o = result["b1"], result["offline"]
    placement = f" (experts {result['expert_placement']})" if "expert_placement" in result else ""
    print(f"{ns.model_dir} {' '.join(extra)}{placement}: HBM {result['bandwidth'] / 1e12:.2f} TB/s, "
          f"matmul {result['matmul'] / 1e12:.0f} TFLOP/s | {format_kv(result)} | "
          f"b1 {1e3 / b['ms_per_token']:.1f} tok/s = {b['ms_per_token']:.2f} ms/token, floor {b['floor_ms']:.2f} ms "
          f"({b['of_floor']:.2f}) | 512x128/128 {o['output_throughput']:.0f} out tok/s, "
          f"{o['total_token_throughput']:.0f} total ({o['of_roofline']:.2f} of roofline)")
    return 0


def _progress(text: str) -> None:
    """A phase's end on stderr, so that the log of a run cut by its time limit says how far it got."""
    print(f"[bench.models {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _exclusive(path: str | None):
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _measure(llm, ns, extra) -> dict:
    bandwidth, matmul = measure_hbm_bandwidth(ns.bandwidth_gib), measure_matmul_rate(ns.matmul_n)
    model = llm.engine.runner.model
    config = model.config
    result = {"flags": extra, "bandwidth": bandwidth, "matmul": matmul, "num_params": config.num_params,
              **kv_cache_report(model)}
    if config.moe is not None:
        result["expert_placement"] = config.moe.placement
    _progress(format_kv(result))  # known before any workload: in the log even if a run is cut

    b1 = list(build_workload(WorkloadSpec(num_prompts=1, input_len=128, output_len=ns.b1_output_len), None))
    run_offline(llm, b1)  # untimed: compiles what the workload meets
    _progress("batch-1 decode compiled")
    r = run_offline(llm, b1)
    ms_per_token = 1e3 * r["duration_s"] / r["total_output_tokens"]
    context = 128 + ns.b1_output_len // 2
    floor_ms = 1e3 * decode_bytes_per_token(llm.engine.runner.params, config, context,
                                            result["kv_bytes_per_token"]) / bandwidth
    result["b1"] = {**r, "ms_per_token": ms_per_token, "floor_ms": floor_ms, "of_floor": floor_ms / ms_per_token}

    spec = WorkloadSpec(num_prompts=ns.offline_prompts, input_len=128, output_len=128)
    batch = list(build_workload(spec, None))
    run_offline(llm, batch)
    _progress(f"batch-1 decode {ms_per_token:.2f} ms/token; 512 x (128 / 128) compiled")
    r = run_offline(llm, batch)
    roofline_tok_s = matmul / (2 * config.num_active_params)  # MoE: the experts a token is routed to
    result["offline"] = {**r, "roofline_total_tok_s": roofline_tok_s,
                         "of_roofline": r["total_token_throughput"] / roofline_tok_s}
    return result


if __name__ == "__main__":
    raise SystemExit(main())
