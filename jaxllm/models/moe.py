"""The mixture-of-experts MLP: a router picks `top_k` experts per token, the experts run as grouped
matmuls over the token copies sorted by expert (each expert multiplies only the tokens routed to it), and
shared experts, where the family has them, see every token."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, Moe
from jaxllm.models import quant
from jaxllm.models.layers import MLP, activation, dense, grouped_dense, param
from jaxllm.models.qdot import kernels_enabled
from jaxllm.models.qgrouped import grouped_dot, merged_outputs


def route(logits, moe: Moe):
    """Router logits [n, experts] → the chosen experts' weights [n, top_k] float32 and ids [n, top_k]:
    softmax over all experts, the top k kept, renormalised to sum to 1 if the family does so (which equals
    a softmax over the top-k logits), then scaled."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(limit_to_top_groups(probs, moe), moe.top_k)
    if moe.normalize_top_k:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * moe.routed_scale, experts


def limit_to_top_groups(probs, moe: Moe):
    """probs [n, experts] with the experts outside each token's `top_groups` best groups (by their best
    expert) set to 0; unchanged with one group."""
    if moe.groups == 1:
        return probs
    n = probs.shape[0]
    grouped = probs.reshape(n, moe.groups, -1)  # [n, groups, experts per group]
    _, best = jax.lax.top_k(jnp.max(grouped, axis=-1), moe.top_groups)  # [n, top_groups]
    keep = jnp.zeros((n, moe.groups), bool).at[jnp.arange(n)[:, None], best].set(True)
    return jnp.where(keep[:, :, None], grouped, 0.0).reshape(probs.shape)


def routed_experts(x, weights, experts, gate_up, down, act, grouped=grouped_dense):
    """Σ_j weights[t, j] · expert_{experts[t, j]}(x[t]) for every token t.

    x [n, D]; weights, experts [n, k]; gate_up [E, D, F, 2] (each expert's gate and up columns interleaved,
    so `--tp`'s split of F keeps each device's gate and up columns together); down [E, F, D].
    The n·k (token, expert) pairs are sorted by expert and each projection is one grouped matmul
    (`grouped(x [m, in], w [E, in, out], group_sizes [E])`, `layers.grouped_dense` unless a kernel swaps it).
    A pair whose expert id is E or more is not computed and adds nothing: with experts placed per device
    (`expert_kernels.py`), the pairs routed to other devices' experts.
    """
    n, k = experts.shape
    num_experts, d, f, _ = gate_up.shape
    flat = experts.reshape(-1)  # [n*k] pair p = token p // k, its (p % k)-th expert
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert; those of no expert here last
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E] pairs per expert (ids ≥ E dropped)
    h = grouped(x[order // k], merged_outputs(gate_up), sizes)  # [n*k, 2F]
    h = h.reshape(n * k, f, 2)
    h = act(h[..., 0]) * h[..., 1]  # [n*k, F]
    y = grouped(h, down, sizes)  # [n*k, D]
    y = y[jnp.argsort(order)].reshape(n, k, d)  # back to pair order
    # Rows past the groups (pairs of no expert here) are zeros from ragged_dot but unwritten by a kernel.
    y = jnp.where((experts < num_experts)[..., None], y.astype(jnp.float32), 0.0)
    return jnp.einsum("nkd,nk->nd", y, weights).astype(x.dtype)


def quantised_experts(x, weights, experts, gate_up, down, act):
    """`routed_experts` on quantised experts (`jaxllm/models/quant.py` types with one leading experts axis); on
    a single GPU, the few pairs for which the 16-bit experts take `expert_kernels.sliced_experts` take it too
    (each pair reads only its expert's quantised weight)."""
    from jaxllm.models import expert_kernels  # it imports this module

    if kernels_enabled() and expert_kernels.kernel_for(x.shape[0], experts.size, gate_up.shape[0]) == "sliced":
        return expert_kernels.sliced_experts(x, weights, experts, gate_up, down, act)
    return routed_experts(x, weights, experts, gate_up, down, act, grouped=grouped_dot)


class MoE(nn.Module):
    """The MLP of a MoE layer. Params: `router` [D, E], `experts_gate_up_proj` [E, D, F, 2],
    `experts_down_proj` [E, F, D], and for shared experts `shared_expert` (a dense MLP) with its
    `shared_expert_gate` [D]."""

    config: ModelConfig
    dtype: Any
    experts_kernel: Callable[..., Any] = routed_experts  # or its drop-in (`expert_kernels.py`)

    @nn.compact
    def __call__(self, x):  # x [n, hidden]
        c, m = self.config, self.config.moe
        d, e, f = c.hidden_size, m.num_experts, m.intermediate_size
        router_dtype = jnp.float32 if m.router_float32 else self.dtype
        # The router is replicated whatever the experts' placement: its own axis name.
        router = param(self, "router", (d, e), ("embed", "router_experts"), router_dtype)
        weights, experts = route(dense(x.astype(router_dtype), router, "nd,de->ne"), m)
        gate_up = param(self, "experts_gate_up_proj", (e, d, f, 2), ("experts", "embed", "expert_mlp", "stack"),
                        self.dtype)
        down = param(self, "experts_down_proj", (e, f, d), ("experts", "expert_mlp", "embed"), self.dtype)
        # Quantised experts: their grouped products (`qgrouped.py`), on every platform.
        kernel = quantised_experts if quant.is_quantised(gate_up) else self.experts_kernel
        out = kernel(x, weights, experts, gate_up, down, activation(c.activation))
        if m.shared_intermediate_size:
            shared = MLP(c, self.dtype, m.shared_intermediate_size, name="shared_expert")(x)
            if m.shared_gate:
                gate = param(self, "shared_expert_gate", (d,), ("embed",), self.dtype)
                shared = shared * jax.nn.sigmoid(dense(x, gate, "nd,d->n"))[:, None]
            out = out + shared
        return out
