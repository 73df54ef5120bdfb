"""Per-token quantisation of a product's input rows (w8a8's int8, fp8_w8a8's e4m3) as one Pallas kernel a row.

x [m, k] → (q [m, k], float32 scale [m]) with x ≈ q · scale per row: int8 as `reference.quantize_rows_int8`
(round half to even, |q| ≤ 127), e4m3 as `reference.quantize_rows_fp8` (scale = max |x| / 448). XLA spends two to
four launches on it (the row's max |x|, then the division and cast, with the norm's or the activation's own
fusions before them); one program a row reads the row twice (the second time from cache) and writes q once.
Two forms of the rows before them fold in, so that their output is never written:
- RMS-normed rows (`norm_weight`, `eps`): x ⊙ weight is quantised and each row's 1 / rms(x) joins its scale
  (`jaxllm/models/normed.py`'s NormedRows);
- gated rows (`gated`): x [m, 2, k] is an MLP's gate/up product and the rows are silu(gate) · up, rounded to x's
  dtype as the unfused model rounds them (GatedRows).
`row_passes` is the two-pass walk over a row's chunks, shared with `two_digit_matmul`'s digits kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import reference

# A row is loaded in as few chunks as fit a program's registers: the smallest power of two ≥ k up to MAX_CHUNK
# inputs, the last chunk masked past k (each chunk's loads issued at once: one memory latency a chunk and pass; a
# warp per 512 inputs of a chunk, 4 to 16, so a thread holds 16 of each row it reads). The first form, 2,048-input
# chunks that divide k, took Llama-3-8B's 14,336-input rows in 7 chunks twice over and lost to XLA (session 25).
MAX_CHUNK = 8192
SCALE_LANES = 16  # the kernel writes each row's scale this many times (a vector store; the caller takes one)
INT8_MAX = 127.0
_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def supports(k: int) -> bool:
    return k >= 16


def row_passes(load, steps: int, write):
    """A row kernel's two passes over its `steps` chunks: `load(c)` → (x, z) float32; the first pass sums x² and
    takes max |z|, the second calls `write(c, z, amax)`. Returns (sum of x², max |z|)."""

    def stats(c, carry):
        ss, amax = carry
        x, z = load(c)
        return ss + jnp.sum(x * x), jnp.maximum(amax, jnp.max(jnp.abs(z)))

    ss, amax = lax.fori_loop(0, steps, stats, (jnp.float32(0.0), jnp.float32(0.0)))

    def write_chunk(c, carry):
        write(c, load(c)[1], amax)
        return carry

    lax.fori_loop(0, steps, write_chunk, 0)
    return ss, amax


def round_half_even(v):
    """jnp.round of float32 v (half to even), from floor: Pallas' Triton lowering has no round."""
    f = jnp.floor(v)
    d = v - f
    odd = f - 2.0 * jnp.floor(f * 0.5)
    return jnp.where((d > 0.5) | ((d == 0.5) & (odd == 1.0)), f + 1.0, f)


def _quantised(z, scale, dtype):
    """z float32 on the grid of `scale` (its row's max |z| / the type's largest value) in `dtype`."""
    v = z / jnp.where(scale > 0, scale, 1.0)
    if dtype == jnp.int8:
        return jnp.clip(round_half_even(v), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return v.astype(dtype)


def _largest(dtype) -> float:
    return INT8_MAX if dtype == jnp.int8 else reference.FP8_MAX


def _kernel(*refs, k: int, chunk: int, steps: int, eps: float, normed: bool, gated: bool, dtype):
    # Refs are read and written as [1, chunk] tiles through broadcast index arrays, one per axis (masked loads and
    # stores need those in interpret mode, and Triton's lowering takes one indexer): `row` picks gate or up in a
    # gated [1, 2, k] block, the row of a [1, k] one (the norm's weight comes as [1, k]).
    x_ref, w_ref, q_ref, s_ref = refs if normed else (refs[0], None, *refs[1:])
    padded = chunk * steps != k  # the last chunk reaches past k: masked

    def tile(ref, row: int, c):
        cols = c * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        lead = (jnp.zeros((1, 1), jnp.int32),) if len(ref.shape) == 3 else ()
        return ref.at[(*lead, jnp.full((1, 1), row, jnp.int32), cols)], cols < k if padded else None

    def read(ref, row: int, c):
        where, mask = tile(ref, row, c)
        return pltriton.load(where, mask=mask, other=0.0 if padded else None).astype(jnp.float32)

    def load(c):
        if gated:
            gate = read(x_ref, 0, c)
            h = (gate / (1.0 + jnp.exp(-gate)) * read(x_ref, 1, c)).astype(x_ref.dtype).astype(jnp.float32)
            return h, h
        x = read(x_ref, 0, c)
        return x, x * read(w_ref, 0, c) if normed else x

    def write(c, z, amax):
        where, mask = tile(q_ref, 0, c)
        pltriton.store(where, _quantised(z, amax / _largest(dtype), dtype), mask=mask)

    ss, amax = row_passes(load, steps, write)
    scale = amax / _largest(dtype)
    if normed:
        scale = scale * lax.rsqrt(ss / k + eps)
    s_ref[0, :] = jnp.full((SCALE_LANES,), scale, jnp.float32)


def _chunking(k: int) -> tuple[int, int]:
    """(chunk, steps) for rows of k inputs: chunks of a power of two, as few as MAX_CHUNK allows."""
    chunk = min(1 << max(4, (k - 1).bit_length()), MAX_CHUNK)
    return chunk, -(-k // chunk)


@functools.partial(jax.jit, static_argnames=("dtype", "eps", "gated", "interpret"))
def quantize_rows(x, dtype, norm_weight=None, eps: float = 0.0, *, gated: bool = False, interpret: bool = False):
    """x [m, k] (gated: [m, 2, k]) → (q [m, k] in `dtype`, int8 or float8_e4m3fn; float32 scale [m]), the rows
    first RMS-normalised with `norm_weight` [k] (float32) and `eps`, or gated; an all-zero row gets scale 0."""
    dtype = jnp.dtype(dtype)
    if dtype not in _DTYPES:
        raise ValueError(f"rows quantise to int8 or float8_e4m3fn, not {dtype}")
    normed = norm_weight is not None
    if normed and gated:
        raise ValueError("rows are either normed or gated")
    m, k = x.shape[0], x.shape[-1]
    if x.shape != ((m, 2, k) if gated else (m, k)):
        raise ValueError(f"rows of shape {x.shape}: [m, k] expected" + (" ([m, 2, k] gated)" if gated else ""))
    if not supports(k):
        raise ValueError(f"no row quantisation kernel for rows of {k} inputs")
    chunk, steps = _chunking(k)
    block = (1, 2, k) if gated else (1, k)
    in_specs = [pl.BlockSpec(block, lambda i: (i,) + (0,) * (len(block) - 1))]
    inputs = [x]
    if normed:
        in_specs.append(pl.BlockSpec((1, k), lambda i: (0, 0)))
        inputs.append(norm_weight.astype(jnp.float32).reshape(1, k))
    q, scale = pl.pallas_call(
        functools.partial(_kernel, k=k, chunk=chunk, steps=steps, eps=eps, normed=normed, gated=gated, dtype=dtype),
        out_shape=(jax.ShapeDtypeStruct((m, k), dtype), jax.ShapeDtypeStruct((m, SCALE_LANES), jnp.float32)),
        grid=(m,), in_specs=in_specs,
        out_specs=(pl.BlockSpec((1, k), lambda i: (i, 0)), pl.BlockSpec((1, SCALE_LANES), lambda i: (i, 0))),
        compiler_params=pltriton.CompilerParams(num_warps=min(16, max(4, chunk // 512)), num_stages=1),
        interpret=interpret, name="quantize_rows",
    )(*inputs)
    return q, scale[:, 0]
