"""w8a16 through XLA's int8 GEMM: x [m, k] @ (int8 w [n, k] * scale [n])ᵀ, with x on an int16 grid per row
written as two int8 digits (x ≈ s · (256 hi + lo)) that are stacked as the 2m rows of one int8 × int8 → int32
product. Not a Pallas kernel: an XLA composition kept beside the kernels it competes with, and measured with
them (`python -m kernels.pallas.bench --quant`). At one row XLA's int8 GEMM reads the weights faster than our
Triton w8a16 kernel (H200, session 16: 34.3 against 37.5 µs for Llama-3-8B's gate_up, 18.5 against 20.5 µs for
its down projection; bf16 56.9 and 30.8), and the sums are exact: x's grid step is 1/32639 of the row's
largest |x|, far below bf16's own rounding of x, and 2m rows of int8 products cannot overflow int32 for
k < 2^31 / 127² ≈ 133,000.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.pallas import reference

DIGIT_GRID = 127 * 256 + 127  # the largest |v| whose two digits both stay within int8
MAX_K = (2**31 - 1) // (128 * 127)  # inputs whose int32 sums cannot overflow (|digit| <= 128, |w| <= 127)


def supports(k: int) -> bool:
    return k <= MAX_K


def int16_digits(x):
    """x [m, k] → (int8 digits [2m, k]: the high digits' rows, then the low ones', float32 scale [m]) with
    x ≈ scale · (256 hi + lo); an all-zero row gets scale 0."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / DIGIT_GRID
    v = jnp.round(x32 / jnp.where(scale > 0, scale, 1.0)[:, None]).astype(jnp.int32)
    lo = (v + 128) % 256 - 128
    return jnp.concatenate([(v - lo) // 256, lo]).astype(jnp.int8), scale


def int8_matmul(x, w, scale):
    """x [m, k] @ (int8 w [n, k] * scale [n])ᵀ → [m, n] in x's dtype."""
    digits, x_scale = int16_digits(x)
    acc = reference.dot_nk(digits, w, jnp.int32).astype(jnp.float32)
    m = x.shape[0]
    return ((acc[:m] * 256 + acc[m:]) * x_scale[:, None] * scale[None, :]).astype(x.dtype)
