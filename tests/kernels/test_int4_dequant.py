"""int4 nibble conversions of `kernels/pallas/int4_dequant.py` inside a Pallas Triton kernel, bit for bit against
the plain definition (q - zero) · scale: every nibble value at every position of a word, every zero point, a
few scales; the inline PTX only where the default backend is a GPU, its interpret-mode ops everywhere."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import int4_dequant

ON_GPU = jax.default_backend() == "gpu"
ROWS, COLS = 16, 64


def _words(rng):
    """[16, 64] int32 words whose nibble j takes all 16 values down every column (from a random offset), with
    per-column zero points 0..15 (each four times) and scales (three magnitudes, random): every nibble value
    at every position meets every zero point."""
    offsets = rng.integers(0, 16, (8, 1, COLS))
    q = (np.arange(ROWS)[None, :, None] + offsets) % 16  # [8, rows, cols]
    words = np.zeros((ROWS, COLS), np.uint32)
    for j in range(8):
        words |= q[j].astype(np.uint32) << np.uint32(4 * j)
    zero = rng.permutation(np.repeat(np.arange(16), COLS // 16)).astype(np.float32)
    scale = rng.uniform(0.5, 1.0, COLS) * rng.choice([1e-3, 0.02, 3.0], COLS)
    return words.view(np.int32), q, zero[None, :], scale[None, :].astype(np.float32)


def _kernel16(p_ref, z_ref, s_ref, o_ref, *, with_scale, interpret, ptx):
    scale = s_ref[...] if with_scale else None
    tiles = int4_dequant.nibbles16(p_ref[...], z_ref[...], scale, o_ref.dtype, interpret, ptx=ptx)
    for j, tile in enumerate(tiles):
        o_ref[j] = tile


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("way", ["ptx", "interpreted ptx", "ops"])
def test_nibbles16_match_plain_ops_bit_for_bit(rng, dtype, with_scale, way):
    """"magic" (the PTX on the GPU; its interpret-mode stand-in) and "magicops" (the bit tricks as plain ops,
    compiled on the GPU, interpreted on the CPU)."""
    if way == "ptx" and not ON_GPU:
        pytest.skip("inline PTX runs only on the GPU (interpret mode runs the plain ops)")
    words, q, zero, scale = _words(rng)
    zero16, scale16 = jnp.asarray(zero, dtype), jnp.asarray(scale, dtype)  # stored as the model stores them
    out = pl.pallas_call(
        functools.partial(_kernel16, with_scale=with_scale, interpret=way == "interpreted ptx", ptx=way != "ops"),
        out_shape=jax.ShapeDtypeStruct((8, ROWS, COLS), dtype), compiler_params=pltriton.CompilerParams(),
        interpret=not ON_GPU,
    )(jnp.asarray(words), zero16, scale16)
    exact = q.astype(np.float32) - zero  # [8, rows, cols]
    if with_scale:
        exact = exact * np.asarray(scale16, np.float32)
    want = np.asarray(jnp.asarray(exact).astype(dtype))  # one rounding of the exact product
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16), want.view(np.uint16))


def _kernel32(p_ref, z_ref, o_ref):
    for j, tile in enumerate(int4_dequant.nibbles32(p_ref[...], z_ref[...])):
        o_ref[j] = tile


def test_nibbles32_are_exact(rng):
    """(q - zero) · 16^(j % 4) exactly (plain ops: the same code on the GPU and in interpret mode), and
    `nibble_weight` undoes the power of two."""
    words, q, zero, _ = _words(rng)
    out = pl.pallas_call(_kernel32, out_shape=jax.ShapeDtypeStruct((8, ROWS, COLS), jnp.float32),
                         compiler_params=pltriton.CompilerParams(), interpret=not ON_GPU)(
        jnp.asarray(words), jnp.asarray(zero, jnp.bfloat16))
    weights = np.array([int4_dequant.nibble_weight(j) for j in range(8)], np.float32)[:, None, None]
    np.testing.assert_array_equal(np.asarray(out) * weights, q.astype(np.float32) - zero)


def _dot_kernel(p_ref, z_ref, x_ref, o_ref, *, interpret):
    xs = [x_ref[j] for j in range(8)]
    o_ref[...] = int4_dequant.dot_nibbles16(p_ref[...], z_ref[...], xs, interpret)


@pytest.mark.parametrize("way", ["ptx", "interpreted ptx"])
def test_dot_nibbles16_rounds_each_multiply_add_to_bf16(rng, way):
    """"fma16": Σ_j x_j · (q_j - zero) with each multiply-add rounded once to bf16, as numpy computes it in
    float64 step by step; and within bf16's rounding of the exact sum."""
    if way == "ptx" and not ON_GPU:
        pytest.skip("inline PTX runs only on the GPU (interpret mode runs the plain ops)")
    words, q, zero, _ = _words(rng)
    x = jnp.asarray(rng.standard_normal((8, ROWS)) * rng.choice([1e-3, 1.0, 40.0], (8, ROWS)), jnp.bfloat16)
    out = pl.pallas_call(
        functools.partial(_dot_kernel, interpret=way == "interpreted ptx"),
        out_shape=jax.ShapeDtypeStruct((ROWS, COLS), jnp.bfloat16), compiler_params=pltriton.CompilerParams(),
        interpret=not ON_GPU,
    )(jnp.asarray(words), jnp.asarray(zero, jnp.bfloat16), x)
    terms = np.asarray(x, np.float64)[:, :, None] * (q.astype(np.float64) - zero)  # [8, rows, cols]
    part = np.zeros((ROWS, COLS))
    for term in terms:
        part = np.asarray(jnp.asarray(part + term, jnp.float32).astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(out, np.float64), part, rtol=2**-8, atol=1e-6)
    exact = terms.sum(0)
    assert np.linalg.norm(np.asarray(out, np.float64) - exact) < 2**-7 * np.linalg.norm(exact)
