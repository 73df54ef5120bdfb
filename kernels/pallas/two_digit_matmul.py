"""w8a16 through XLA's int8 GEMM: x [m, k] @ (int8 w [n, k] * scale [n])ᵀ, with x on an int16 grid per row
written as two int8 digits (x ≈ s · (256 hi + lo)) that are stacked as the 2m rows of one int8 × int8 → int32
product. An XLA composition kept beside the kernels it competes with, and measured with them (`python -m
kernels.pallas.bench --quant`); the digits come from XLA's ops or from one Pallas kernel (`int16_digits_kernel`:
one program per row, the row's reductions and its digits in one launch where XLA takes two or three), and may
stand for the rows after an RMS norm (its weight folded into them, its 1 / rms into their scale). At one row
XLA's int8 GEMM reads the weights faster than our Triton w8a16 kernel (H200, session 16: 34.3 against 37.5 µs
for Llama-3-8B's gate_up, 18.5 against 20.5 µs for its down projection; bf16 56.9 and 30.8), and the sums are
exact: x's grid step is 1/32639 of the row's largest |x|, far below bf16's own rounding of x, and 2m rows of
int8 products cannot overflow int32 for k < 2^31 / 127² ≈ 133,000.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import plan, reference, row_quant

DIGIT_GRID = 127 * 256 + 127  # the largest |v| whose two digits both stay within int8
MAX_K = (2**31 - 1) // (128 * 127)  # inputs whose int32 sums cannot overflow (|digit| <= 128, |w| <= 127)
SCALE_LANES = row_quant.SCALE_LANES
CHUNK = 2048  # inputs the kernel loads at a time (the largest power of two up to this that divides k)
_F32_MAX = float(jnp.finfo(jnp.float32).max)


def supports(k: int) -> bool:
    return k <= MAX_K


def kernel_supports(k: int) -> bool:
    return supports(k) and plan.pow2_divisor(k, CHUNK, 16) is not None


def int16_digits(x, norm_weight=None, eps: float = 0.0):
    """x [m, k] → (int8 digits [2m, k]: the high digits' rows, then the low ones', float32 scale [m]) with
    x ≈ scale · (256 hi + lo); an all-zero row gets scale 0. With `norm_weight` [k] (float32) the rows are first
    RMS-normalised (x / rms(x) ⊙ weight, `eps` inside the root): the digits are those of x ⊙ weight and each
    row's 1 / rms goes into its scale, so the normalised rows are never formed."""
    x32 = x.astype(jnp.float32)
    z = x32 if norm_weight is None else x32 * norm_weight
    amax = jnp.max(jnp.abs(z), axis=-1)
    digits, scale = _digits_of(z, amax)
    if norm_weight is not None:
        scale = scale * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + eps)
    return digits, scale


def _digits_of(z, amax):
    """z [m, k] float32 and its rows' max |z| [m] → (digits [2m, k], scale [m])."""
    hi, lo = _split(z, _inverse_step(amax)[:, None])
    return jnp.concatenate([hi, lo]), amax / DIGIT_GRID


def _split(z, inverse):
    """z's grid values v = ⌊z · inverse + ½⌋ as int8 digits (hi, lo), v = 256 hi + lo with lo in [-128, 128): XLA's
    digits and the Pallas kernel's both come from here, so the two agree exactly."""
    v = jnp.floor(z * inverse + 0.5).astype(jnp.int32)
    lo = ((v + 128) & 255) - 128
    return ((v - lo) >> 8).astype(jnp.int8), lo.astype(jnp.int8)


def _inverse_step(amax):
    """GRID / amax (0 for an all-zero row), at most float32's largest finite value: a row of subnormal numbers,
    where no flush to zero removed them, gives zero digits, not inf · 0."""
    return jnp.where(amax > 0, jnp.minimum(DIGIT_GRID / jnp.where(amax > 0, amax, 1.0), _F32_MAX), 0.0)


def int8_matmul(x, w, scale, norm_weight=None, eps: float = 0.0, digits_kernel: bool = False):
    """x [m, k] @ (int8 w [n, k] * scale [n])ᵀ → [m, n] in x's dtype; with `norm_weight`, of x's RMS-normalised
    rows (int16_digits); `digits_kernel`: the digits from the Pallas kernel, not XLA's ops."""
    digits, x_scale = (int16_digits_kernel if digits_kernel else int16_digits)(x, norm_weight, eps)
    acc = reference.dot_nk(digits, w, jnp.int32).astype(jnp.float32)
    m = x.shape[0]
    return ((acc[:m] * 256 + acc[m:]) * x_scale[:, None] * scale[None, :]).astype(x.dtype)


def _digits_kernel(*refs, chunk: int, steps: int, eps: float, normed: bool):
    """One row: its sum of squares and max |z| (z = x, or x ⊙ weight when normed) in one pass over the chunks, its
    digits in a second (the row is a few KB: the second pass reads it from cache)."""
    x_ref, w_ref, o_ref, s_ref = refs if normed else (refs[0], None, *refs[1:])

    def load(c):
        x = x_ref[0, pl.ds(c * chunk, chunk)].astype(jnp.float32)
        return x, x * w_ref[pl.ds(c * chunk, chunk)] if normed else x

    def write(c, z, amax):
        hi, lo = _split(z, _inverse_step(amax))
        o_ref[0, 0, pl.ds(c * chunk, chunk)] = hi
        o_ref[1, 0, pl.ds(c * chunk, chunk)] = lo

    ss, amax = row_quant.row_passes(load, steps, write)
    scale = amax / DIGIT_GRID
    if normed:
        scale = scale * lax.rsqrt(ss / (steps * chunk) + eps)
    s_ref[0, :] = jnp.full((SCALE_LANES,), scale, jnp.float32)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def int16_digits_kernel(x, norm_weight=None, eps: float = 0.0, *, interpret: bool = False):
    """int16_digits (the same digits; the scale up to float32 summation order) as one Pallas kernel."""
    m, k = x.shape
    chunk = plan.pow2_divisor(k, CHUNK, 16)
    if chunk is None or not supports(k):
        raise ValueError(f"no digits kernel for rows of {k} inputs")
    normed = norm_weight is not None
    inputs = (x, norm_weight.astype(jnp.float32)) if normed else (x,)
    in_specs = [pl.BlockSpec((1, k), lambda i: (i, 0))] + ([pl.BlockSpec((k,), lambda i: (0,))] if normed else [])
    digits, scale = pl.pallas_call(
        functools.partial(_digits_kernel, chunk=chunk, steps=k // chunk, eps=eps, normed=normed),
        out_shape=(jax.ShapeDtypeStruct((2, m, k), jnp.int8), jax.ShapeDtypeStruct((m, SCALE_LANES), jnp.float32)),
        grid=(m,), in_specs=in_specs,
        out_specs=(pl.BlockSpec((2, 1, k), lambda i: (0, i, 0)), pl.BlockSpec((1, SCALE_LANES), lambda i: (i, 0))),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="int16_digits",
    )(*inputs)
    return digits.reshape(2 * m, k), scale[:, 0]
