"""Rows on their way into a product, their RMS norm not applied yet.

A norm whose output feeds only products (a Llama block's two norms: attention's fused q/k/v product, the MLP's
gate/up product) hands `dense` a `NormedRows` instead of its output. A product that can fold the norm into its
own prologue takes the raw rows: the one-row w8a16 product (`jaxllm/models/qdot.py`) writes x ⊙ weight as two
int8 digits and multiplies the row's 1/rms into the digits' row scale, so the norm's output is never written and
its reduction is a sibling of the digits' own; the per-token quantised products (w8a8, fp8) quantise x ⊙ weight
and multiply each row's 1/rms into its quantisation scale alike. Every other product calls `value()`, the norm's
usual output, computed by the same expression `Norm` uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
