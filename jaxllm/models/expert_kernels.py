"""The routed experts' kernel, chosen once at start-up like the attention backend: XLA's `lax.ragged_dot` on
the CPU; on GPU our Pallas grouped matmul (`kernels/pallas/grouped_matmul.py`), because XLA's GPU lowering
of a ragged dot pads every expert to the whole batch unless cuDNN takes it. Under `--tp` the kernel runs per
device under `shard_map` on the device's slice of every expert's intermediate axis, and the partial outputs
are summed across devices."""

from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxllm.models.backends import GPU_PLATFORMS
from jaxllm.models.moe import routed_experts
from jaxllm.parallel import TP_AXIS
from kernels.pallas.grouped_matmul import grouped_matmul

# gate_up [E, D, F, 2] and down [E, F, D], split on F as `parallel.logical_rules` places them ("expert_mlp").
_EXPERT_SPECS = (PartitionSpec(None, None, TP_AXIS, None), PartitionSpec(None, TP_AXIS, None))


def experts_kernel(platform: str, mesh: Mesh | None = None, interpret: bool = False, **blocks) -> Callable:
    """`routed_experts`' drop-in for `platform`; `interpret`: the Pallas kernel in interpret mode (CPU tests);
    `blocks`: grouped_matmul's block sizes and launch settings (its defaults otherwise)."""
    if platform not in GPU_PLATFORMS and not interpret:
        return routed_experts
    local = functools.partial(routed_experts, grouped=functools.partial(grouped_matmul, interpret=interpret,
                                                                        **blocks))
    tp = mesh.shape[TP_AXIS] if mesh is not None and TP_AXIS in mesh.shape else 1
    return local if tp == 1 else functools.partial(_per_device, local, mesh)


def _per_device(local, mesh, x, weights, experts, gate_up, down, act):
    def partial_sum(x, weights, experts, gate_up, down):
        return jax.lax.psum(local(x, weights, experts, gate_up, down, act), TP_AXIS)

    replicated = PartitionSpec()
    return jax.shard_map(partial_sum, mesh=mesh, in_specs=(replicated, replicated, replicated, *_EXPERT_SPECS),
                         out_specs=replicated, check_vma=False)(x, weights, experts, gate_up, down)
