"""The routed experts' kernel, chosen once at start-up like the attention backend (`experts_kernel`): XLA's
`lax.ragged_dot` on the CPU; on the GPU the fastest of three for each step's token count, which is static at
trace time (`kernel_for`): a dynamic slice of each routed expert's weights per (token, expert) pair for a few
pairs, XLA's ragged dot in the middle, our Pallas grouped matmul (`kernels/pallas/grouped_matmul.py`) above.
Under `--tp` the kernel runs per device under `shard_map`, on the experts as `placement` puts them
(`parallel.EXPERT_PLACEMENTS`): a slice of every expert's intermediate axis, or whole experts; either way the
router is replicated and the devices' outputs are summed."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxllm.models.backends import GPU_PLATFORMS
from jaxllm.models.layers import dense
from jaxllm.models.moe import routed_experts
from jaxllm.models.qgrouped import expert_of
from jaxllm.parallel import TP_AXIS, expert_specs
from kernels.pallas.grouped_matmul import grouped_matmul

# The thresholds, from one Mixtral-8x7B layer on the H200 (8 experts [4096, 14336], top 2, bf16; docs/perf.md
# session 7, "MoE experts"). XLA's ragged dot reads every expert whatever the routing (0.869 ms at 1 token, 0.976
# at 64); a sliced pair reads only its expert (0.735 ms for 1 token's 2 pairs: 0.37 ms a pair against ragged's
# 0.109 ms an expert, 3.4x), so sliced wins while the pairs are at most a quarter of the (device's) experts.
SLICED_PAIRS_PER_EXPERT = 0.25
SLICED_MAX_PAIRS = 16  # one unrolled product per pair: bounds the step's trace and compile time
# XLA's GPU ragged dot multiplies every expert with every row (its lowering pads each expert to the batch): it
# stays bound by reading the weights up to about the ridge point of bf16 matmuls, rate / bandwidth = 614 TFLOP/s /
# 3.26 TB/s ≈ 190 tokens, whatever the expert count, and grows with tokens × experts past it (60.3 ms at 8,192
# tokens against Pallas' 16.2), while the Pallas kernel multiplies only the routed pairs but was slower below
# (1.409 ms against 0.976 at 64 tokens). The last power of two below the ridge keeps XLA's.
RAGGED_DOT_MAX_TOKENS = 128

KERNELS = ("auto", "sliced", "ragged_dot", "pallas")


def kernel_for(tokens: int, pairs: int, num_experts: int) -> str:
    """The fastest kernel's name for a step of `tokens` tokens routed to `pairs` (token, expert) pairs over
    `num_experts` experts (those of one device, with experts placed per device)."""
    if pairs <= min(SLICED_MAX_PAIRS, num_experts * SLICED_PAIRS_PER_EXPERT):
        return "sliced"
    return "ragged_dot" if tokens <= RAGGED_DOT_MAX_TOKENS else "pallas"


def sliced_experts(x, weights, experts, gate_up, down, act):
    """`routed_experts`' drop-in for a few pairs: per (token, expert) pair, one product with the expert's
    matrices as a dynamic slice of the stacked weights (XLA feeds the slice to the dot in place), so each pair
    reads only its expert; quantised experts too, each pair's product `qdot.dot` of its expert's quantised
    weight). A pair whose expert id is E or more adds nothing, as in `routed_experts`."""
    n, k = experts.shape
    num_experts = gate_up.shape[0]
    rows = []
    for t in range(n):
        out = jnp.zeros(x.shape[1:], jnp.float32)  # [D]
        for j in range(k):
            e = experts[t, j]
            h = dense(x[t][None], expert_of(gate_up, e), "nd,dfs->nfs")[0]  # [F, 2]
            y = dense((act(h[:, 0]) * h[:, 1])[None], expert_of(down, e), "nf,fd->nd")[0]
            out = out + jnp.where(e < num_experts, y.astype(jnp.float32) * weights[t, j], 0.0)
        rows.append(out)
    return jnp.stack(rows).astype(x.dtype)


def experts_kernel(platform: str, mesh: Mesh | None = None, placement: str = "split", kernel: str = "auto",
                   interpret: bool = False, **blocks) -> Callable:
    """`routed_experts`' drop-in for `platform` on `mesh` (experts placed by `placement`). `kernel`: one of
    KERNELS ("auto": by token count on the GPU, XLA's ragged dot on the CPU); `interpret`: as on the GPU, with
    the Pallas kernel in interpret mode (CPU tests); `blocks`: grouped_matmul's block sizes and launch settings
    (its defaults otherwise)."""
    if kernel not in KERNELS:
        raise ValueError(f"experts kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    kernels = {
        "sliced": sliced_experts,
        "ragged_dot": routed_experts,
        "pallas": functools.partial(routed_experts, grouped=functools.partial(grouped_matmul, interpret=interpret,
                                                                              **blocks)),
    }
    if kernel != "auto":
        local = kernels[kernel]
    elif platform in GPU_PLATFORMS or interpret:
        local = functools.partial(_by_token_count, kernels)
    else:
        local = routed_experts
    tp = mesh.shape[TP_AXIS] if mesh is not None and TP_AXIS in mesh.shape else 1
    return local if tp == 1 else functools.partial(_on_devices, local, mesh, placement)


def _by_token_count(kernels: dict, x, weights, experts, gate_up, down, act):
    name = kernel_for(x.shape[0], experts.size, gate_up.shape[0])
    return kernels[name](x, weights, experts, gate_up, down, act)


def _on_devices(local, mesh, placement, x, weights, experts, gate_up, down, act):
    """`local` on each device's experts (tokens and routing replicated), the devices' outputs summed."""

    def partial_sum(x, weights, experts, gate_up, down):
        if placement == "per_device":  # device i holds experts [i·E_local, (i + 1)·E_local)
            here = gate_up.shape[0]
            experts = experts - jax.lax.axis_index(TP_AXIS) * here
            experts = jnp.where((experts >= 0) & (experts < here), experts, here)  # `here`: on another device
        return jax.lax.psum(local(x, weights, experts, gate_up, down, act), TP_AXIS)

    replicated = PartitionSpec()
    return jax.shard_map(partial_sum, mesh=mesh, in_specs=(replicated, replicated, replicated,
                                                           *expert_specs(placement)),
                         out_specs=replicated, check_vma=False)(x, weights, experts, gate_up, down)
