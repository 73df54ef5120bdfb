"""Second pass of split-K (flash-decoding) attention: merge per-split partial outputs by their log-sum-exp."""

from __future__ import annotations

import jax.numpy as jnp


def combine(o_part, lse):
    """o_part [splits, n, heads, head_dim] float32, each split's softmax-normalised output;
    lse [splits, n, heads] its base-2 log-sum-exp (-inf for a split that saw no key).
    Returns [n, heads, head_dim] float32, the softmax over all splits' keys."""
    top = jnp.max(lse, axis=0)  # [n, heads]
    top = jnp.where(top == -jnp.inf, 0.0, top)
    weight = jnp.exp2(lse - top[None])  # [splits, n, heads]; 0 for empty splits
    total = jnp.sum(weight, axis=0)
    total = jnp.where(total > 0, total, 1.0)
    return jnp.einsum("snh,snhd->nhd", weight, o_part) / total[..., None]
