"""`python -m jaxllm.bench.experts`: one MoE layer's routed experts (a config's expert shapes, random routing)
by each grouped-matmul implementation, against the floor of the expert bytes the tokens must read (small
batches are memory-bound) and the FLOPs they must do (large batches).

- `auto`: as served on the GPU (`jaxllm/models/expert_kernels.py`): `sliced`, `ragged_dot` or `pallas` by the
  step's token count (the table says which it chose).
- `ragged_dot`: the model's path (pairs sorted by expert, `jax.lax.ragged_dot` per projection) as XLA lowers
  it. On GPU, XLA rewrites a ragged dot into a dense one over every expert unless cuDNN takes it: run once
  more with `XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true`.
- `pallas`: the same path with our Triton-lowered Pallas kernel (`kernels/pallas/grouped_matmul.py`: tiles of
  one expert's rows, experts without rows skipped) as the grouped matmul.
- `sliced`: one product per (token, expert) pair, each expert's matrices a dynamic slice of the stacked weights
  (small batches only: n·k products; XLA feeds the slices to the matmuls without copying them).
- `mgpu`: the same path with JAX's Pallas Mosaic GPU ragged-dot kernel (Hopper) as the grouped matmul.
- `dense_loop`: every expert over every token, unrouted pairs weighted 0 (the padded form, for comparison).
- `gathered`: each (token, expert) pair's matrices gathered, one batched product per pair (reads n·k experts).
`--tp N` runs the served kernels (`auto`, `sliced`, `ragged_dot`, `pallas`) per device on N devices as `--tp`
serves them, the experts placed by `--placement`: `split` (each expert's intermediate axis split across the
devices) or `per_device` (whole experts on each device; `JAXLLM_EXPERT_PLACEMENT` chooses it for the server).
`--quant SCHEME` (w8a16, w4a16, w8a8, fp8_w8a8) adds `quantised-auto`: the experts quantised as a weight `--mode`
stores them, through the products the model serves them with (`jaxllm/models/qgrouped.py`, one device), its
floor at the quantised bytes; for w8a16 also `quantised-xla` and `quantised-pallas`, each of its two products
at every token count without the sliced pairs (what `qgrouped.PALLAS_MIN_ROWS` should be set from).
`--smoke` runs tiny shapes on the CPU and checks that the implementations (and placements) agree.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.bench.step import measure_hbm_bandwidth, measure_matmul_rate, median_seconds
from jaxllm.config import ModelConfig
from jaxllm.models.expert_kernels import KERNELS as SERVED, experts_kernel, kernel_for
from jaxllm.models import qgrouped, quant
from jaxllm.models.layers import activation
from jaxllm.models.moe import quantised_experts, routed_experts
from jaxllm.parallel import EXPERT_PLACEMENTS, expert_specs, make_mesh

IMPLEMENTATIONS = (*SERVED, "mgpu", "dense_loop", "gathered")


def dense_loop(x, weights, experts, gate_up, down, act):
    """Σ over all experts of expert(x) · (the token's weight for it, 0 if not routed there)."""
    num_experts, d, f, _ = gate_up.shape
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts):
        h = jnp.einsum("nd,dfs->nfs", x, gate_up[e])
        y = jnp.einsum("nf,fd->nd", act(h[..., 0]) * h[..., 1], down[e])
        share = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=-1)  # [n]
        out = out + y.astype(jnp.float32) * share[:, None]
    return out.astype(x.dtype)


def gathered(x, weights, experts, gate_up, down, act):
    h = jnp.einsum("nd,nkdfs->nkfs", x, gate_up[experts])  # [n, k, F, 2]
    y = jnp.einsum("nkf,nkfd->nkd", act(h[..., 0]) * h[..., 1], down[experts])
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def mgpu_grouped(block: tuple[int, int, int, int, int]):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    block_m, block_n, block_k, steps, grid_n = block

    def grouped(x, w, sizes):
        return ragged_dot_mgpu.ragged_dot(x, w, group_sizes=sizes, block_m=block_m, block_n=block_n,
                                          block_k=block_k, max_concurrent_steps=steps, grid_block_n=grid_n)

    return grouped


def served(name: str, block: tuple[int, int, int, int, int] | None = None, interpret: bool = False, mesh=None,
           placement: str = "split"):
    """A served experts kernel (one of SERVED) as the engine runs it on the GPU (per device under shard_map on a
    `mesh` of more than one); `block`: the Pallas kernel's block_m (0: by row count), block_n, block_k,
    num_warps, num_stages (None: its defaults)."""
    blocks = {}
    if block is not None:
        block_m, block_n, block_k, warps, stages = block
        blocks = dict(block_m=block_m or None, block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages)
    return experts_kernel("gpu", mesh, placement, name, interpret=interpret, **blocks)


def implementation(name: str, mgpu_block=None, pallas_block=None, interpret: bool = False, mesh=None,
                   placement: str = "split"):
    if name in SERVED:
        return served(name, pallas_block, interpret, mesh, placement)
    if name == "mgpu":
        return functools.partial(routed_experts, grouped=mgpu_grouped(mgpu_block))
    return {"dense_loop": dense_loop, "gathered": gathered}[name]


def random_weights(num_experts: int, hidden: int, inter: int, dtype, seed: int = 0):
    """gate_up [E, D, F, 2], down [E, F, D] (numpy's generator: eager jax.random would compile each op)."""
    rng = np.random.default_rng(seed)
    gate_up = rng.standard_normal((num_experts, hidden, inter, 2), np.float32) * hidden ** -0.5
    down = rng.standard_normal((num_experts, inter, hidden), np.float32) * inter ** -0.5
    return jnp.asarray(gate_up, dtype), jnp.asarray(down, dtype)


def random_routing(tokens: int, num_experts: int, hidden: int, top_k: int, dtype, seed: int = 0):
    """x [n, D], weights [n, k] (summing to 1), experts [n, k] (k distinct per token, uniform)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, hidden), np.float32), dtype)
    experts = jnp.asarray(np.argsort(rng.random((tokens, num_experts)), axis=-1)[:, :top_k], jnp.int32)
    weights = rng.random((tokens, top_k), np.float32) + 0.1
    return x, jnp.asarray(weights / weights.sum(-1, keepdims=True)), experts


def random_layer(num_experts: int, hidden: int, inter: int, tokens: int, top_k: int, dtype, seed: int = 0):
    """x, weights, experts, gate_up, down: the arguments of `routed_experts` and the alternatives."""
    return (*random_routing(tokens, num_experts, hidden, top_k, dtype, seed),
            *random_weights(num_experts, hidden, inter, dtype, seed))


def placed(args, tp: int, placement: str):
    """`args` (x, weights, experts, gate_up, down) on a `tp` mesh: routing replicated, experts by `placement`."""
    mesh = make_mesh(tp)
    x, weights, experts, gate_up, down = args
    rep = NamedSharding(mesh, PartitionSpec())
    gate_up_spec, down_spec = expert_specs(placement)
    return (*(jax.device_put(a, rep) for a in (x, weights, experts)),
            jax.device_put(gate_up, NamedSharding(mesh, gate_up_spec)), jax.device_put(down, NamedSharding(mesh, down_spec)))


def quantised_layer(gate_up, down, scheme: str):
    """The experts' weights as a weight `--mode` of `scheme` stores them, and their bytes per weight."""
    q = tuple(jax.jit(lambda w: quant.quantize(w, quant.WeightQuant(scheme), 1, 1))(w) for w in (gate_up, down))
    return q, quant.nbytes(q) / (gate_up.size + down.size)


def floor_seconds(experts, hidden, inter, itemsize, bandwidth, rate) -> float:
    """max(bytes of the distinct experts routed to / bandwidth, FLOPs of the routed pairs / matmul rate)."""
    touched = len(np.unique(np.asarray(experts)))
    bytes_ = touched * 3 * hidden * inter * itemsize
    flops = 2 * experts.size * 3 * hidden * inter
    return max(bytes_ / bandwidth, flops / rate)


def _applies(name: str, pairs: int, tp: int) -> bool:
    """sliced: small batches only; beyond one device: the served kernels."""
    if name == "sliced" and pairs > 128:
        return False
    return tp == 1 or name in SERVED


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxllm.bench.experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a MoE config.json (e.g. ../shared/configs/mixtral-8x7b.json)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 8192])
    p.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    p.add_argument("--mgpu-block", type=lambda t: tuple(int(v) for v in t.split(",")), default=(64, 128, 64, 4, 1),
                   help="block_m,block_n,block_k,max_concurrent_steps,grid_block_n of the mgpu kernel")
    p.add_argument("--pallas-block", type=lambda t: tuple(int(v) for v in t.split(",")), default=None,
                   help="block_m,block_n,block_k,num_warps,num_stages of our Pallas kernel (block_m 0: by row "
                        "count; default: the kernel's, as served)")
    p.add_argument("--tp", type=int, default=1, help="devices (beyond 1: the served kernels, as --tp serves them)")
    p.add_argument("--placement", choices=EXPERT_PLACEMENTS, default="split", help="experts across --tp devices")
    p.add_argument("--quant", choices=quant.SCHEMES, default=None,
                   help="also time the experts quantised in this scheme (`quantised`; one device)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU; checks the implementations agree")
    p.add_argument("--result-json", default=None)
    ns = p.parse_args(argv)

    if ns.smoke:
        return smoke(ns)
    config = ModelConfig.from_hf_dict(json.loads(Path(ns.config).read_text()))
    if config.moe is None:
        p.error(f"{ns.config} has no mixture of experts")
    m, dtype = config.moe, jnp.bfloat16
    act = activation(config.activation)
    bandwidth, rate = measure_hbm_bandwidth(), measure_matmul_rate()
    print(f"device {jax.devices()[0].device_kind}: HBM read {bandwidth / 1e12:.2f} TB/s, "
          f"bf16 matmul {rate / 1e12:.0f} TFLOP/s; experts {m.num_experts} x [{config.hidden_size}, "
          f"{m.intermediate_size}], top {m.top_k}; tp {ns.tp}" + (f" (experts {ns.placement})" if ns.tp > 1 else ""))
    rows = []
    layer_weights = random_weights(m.num_experts, config.hidden_size, m.intermediate_size, dtype)
    if ns.quant and ns.tp == 1:
        quantised, quant_itemsize = quantised_layer(*layer_weights, ns.quant)
    for tokens in ns.tokens:
        args = (*random_routing(tokens, m.num_experts, config.hidden_size, m.top_k, dtype), *layer_weights)
        # Each of --tp devices reads and multiplies its share (perfectly balanced: the floor).
        floor = floor_seconds(args[2], config.hidden_size, m.intermediate_size, 2, bandwidth, rate) / ns.tp
        if ns.tp > 1:
            args = placed(args, ns.tp, ns.placement)
        mesh = make_mesh(ns.tp) if ns.tp > 1 else None
        local_experts = m.num_experts // ns.tp if ns.placement == "per_device" else m.num_experts
        for name in ns.impl:
            if not _applies(name, tokens * m.top_k, ns.tp):
                continue
            impl = implementation(name, ns.mgpu_block, ns.pallas_block, mesh=mesh, placement=ns.placement)
            fn = jax.jit(lambda *a, _f=impl: _f(*a, act))
            try:
                seconds = median_seconds(lambda: fn(*args), ns.repeats)
            except Exception as e:  # noqa: BLE001  one implementation failing must not hide the others' rows
                print(f"  {name} at {tokens} tokens failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            chose = kernel_for(tokens, tokens * m.top_k, local_experts) if name == "auto" else name
            rows.append({"impl": name, "kernel": chose, "tp": ns.tp, "placement": ns.placement, "tokens": tokens,
                         "ms": seconds * 1e3, "floor_ms": floor * 1e3, "of_floor": floor / seconds})
        if ns.quant and ns.tp == 1:
            floor = floor_seconds(args[2], config.hidden_size, m.intermediate_size, quant_itemsize, bandwidth, rate)
            # as served (auto: `moe.quantised_experts`, sliced pairs included) and, for w8a16, each grouped product
            for int8_kernel in qgrouped.INT8_KERNELS if ns.quant == "w8a16" else ("auto",):
                grouped = functools.partial(qgrouped.grouped_dot, int8_kernel=int8_kernel)
                fn = jax.jit(lambda *a, _g=grouped: routed_experts(*a, act, grouped=_g)) if int8_kernel != "auto" \
                    else jax.jit(lambda *a: quantised_experts(*a, act))
                seconds = median_seconds(lambda: fn(*args[:3], *quantised), ns.repeats)
                rows.append({"impl": f"quantised-{int8_kernel}", "kernel": ns.quant, "tp": 1,
                             "placement": ns.placement, "tokens": tokens, "ms": seconds * 1e3,
                             "floor_ms": floor * 1e3, "of_floor": floor / seconds})
    print(f"{'impl':>16} {'kernel':>11} {'tokens':>7} {'ms':>9} {'floor ms':>9} {'of floor':>9}")
    for r in rows:
        print(f"{r['impl']:>16} {r['kernel']:>11} {r['tokens']:>7} {r['ms']:>9.3f} {r['floor_ms']:>9.3f} "
              f"{r['of_floor']:>9.2f}")
    if ns.result_json:
        Path(ns.result_json).write_text(json.dumps({"bandwidth": bandwidth, "matmul": rate, "rows": rows}, indent=2))
    return 0


def smoke(ns) -> int:
    """Every CPU-capable implementation against the model's path on tiny ragged routings (the Pallas kernel in
    interpret mode), and the served choice on 2 devices in both placements (tests/models/test_expert_kernels.py
    checks each kernel in each placement)."""
    act = activation("silu")
    pallas_block = (16, 16, 16, 4, 1)
    for tokens in (1, 5):
        args = random_layer(8, 32, 64, tokens, 2, jnp.float32, seed=tokens)
        expected = np.asarray(jax.jit(routed_experts, static_argnums=5)(*args, act))
        for name in ("auto", "sliced", "pallas", "dense_loop", "gathered"):
            impl = implementation(name, pallas_block=pallas_block, interpret=True)
            got = np.asarray(jax.jit(impl, static_argnums=5)(*args, act))
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=f"{name} at {tokens} tokens")
        print(f"{tokens} tokens: auto ({kernel_for(tokens, 2 * tokens, 8)}), sliced, pallas, dense_loop and "
              "gathered agree with ragged_dot")
        (q_gate_up, q_down), _ = quantised_layer(*args[3:], "w8a16")
        got = np.asarray(jax.jit(quantised_experts, static_argnums=5)(*args[:3], q_gate_up, q_down, act))
        dequantised = np.asarray(jax.jit(routed_experts, static_argnums=5)(
            *args[:3], quant.dequantize(q_gate_up), quant.dequantize(q_down), act))
        np.testing.assert_allclose(got, dequantised, atol=1e-4, rtol=1e-4, err_msg=f"w8a16 at {tokens} tokens")
        if len(jax.devices()) >= 2:
            for placement in EXPERT_PLACEMENTS:
                impl = implementation("auto", interpret=True, mesh=make_mesh(2), placement=placement)
                got = np.asarray(jax.jit(impl, static_argnums=5)(*placed(args, 2, placement), act))
                np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=f"tp 2, experts {placement}")
            print(f"{tokens} tokens: auto on 2 devices (experts split, experts per device) agrees")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
