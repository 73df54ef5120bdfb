"""Rows on their way into a product, their last row-wise step not applied yet.

A norm whose output feeds only products (a Llama block's two norms: attention's fused q/k/v product, the MLP's
gate/up product) hands `dense` a `NormedRows` instead of its output, and a gated MLP hands its down-projection a
`GatedRows` (the gate/up product before act(gate) · up). A product that can fold that step into its own prologue
takes the raw rows: the one-row w8a16 product (`jaxllm/models/qdot.py`) writes x ⊙ weight as two int8 digits and
multiplies the row's 1/rms into the digits' row scale, so the norm's output is never written and its reduction is a
sibling of the digits' own; the per-token quantised products (w8a8, fp8) quantise x ⊙ weight and multiply each
row's 1/rms into its quantisation scale alike, and on the GPU quantise silu(gate) · up in the same kernel that
forms it (`kernels/pallas/row_quant.py`). Every other product calls `value()`, the step's usual output, computed
by the same expression the model used before.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


def rms_normalise(x32, weight32, eps: float):
    """x32 [..., d] float32 → x / rms(x) ⊙ weight, in float32."""
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * weight32


@dataclasses.dataclass(frozen=True)
class NormedRows:
    """x [n, d] to be RMS-normalised over d with `weight` [d] (float32, Gemma's + 1 applied) and `eps`, then
    cast to `dtype`."""

    x: jax.Array
    weight: jax.Array
    eps: float
    dtype: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    def value(self):
        """The norm's output [n, d] in `dtype`."""
        return rms_normalise(self.x.astype(jnp.float32), self.weight, self.eps).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class GatedRows:
    """A gated MLP's gate/up product h [n, 2, f] on its way into the down-projection: the rows are act(gate) · up."""

    h: jax.Array
    act: Callable

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.h.shape[0], self.h.shape[2])

    @property
    def dtype(self):
        return self.h.dtype

    def value(self):
        """act(gate) · up [n, f] in h's dtype."""
        return self.act(self.h[:, 0]) * self.h[:, 1]
