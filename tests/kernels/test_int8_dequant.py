"""int8 → 16-bit conversions of `kernels/pallas/int8_dequant.py`: exact for every int8 value, inside a Pallas
Triton kernel (the inline-PTX modes only where the default backend is a GPU; the plain-ops mode in interpret
mode on the CPU too), and the per-row query quantisation of "qk8"."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import int8_dequant

ON_GPU = jax.default_backend() == "gpu"


def _convert_kernel(x_ref, o_ref, *, mode):
    o_ref[...] = int8_dequant.convert(x_ref[...], o_ref.dtype, mode, interpret=not ON_GPU)


@pytest.mark.parametrize(
    "mode,dtype",
    [("magic", jnp.bfloat16), ("magic", jnp.float16), ("f16", jnp.float16), ("f16ops", jnp.float16)],
)
def test_every_int8_value_converts_exactly(mode, dtype):
    if mode != "f16ops" and not ON_GPU:
        pytest.skip("inline PTX runs only on the GPU (interpret mode casts)")
    values = np.random.default_rng(5).permutation(np.arange(-128, 128)).astype(np.int8).reshape(16, 16)
    out = pl.pallas_call(
        functools.partial(_convert_kernel, mode=mode), out_shape=jax.ShapeDtypeStruct((16, 16), dtype),
        compiler_params=pltriton.CompilerParams(), interpret=not ON_GPU,
    )(jnp.asarray(values))
    np.testing.assert_array_equal(np.asarray(out, np.float32), values.astype(np.float32))


def test_query_rows_quantise_symmetrically():
    q = jnp.asarray(np.random.default_rng(6).standard_normal((4, 64)) * [[0.01], [1.0], [30.0], [0.0]], jnp.bfloat16)
    q_i8, scale = int8_dequant.quantize_rows(q)
    q32 = np.asarray(q, np.float32)
    np.testing.assert_allclose(np.asarray(scale), np.abs(q32).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(np.asarray(q_i8, np.int32)).max(axis=1).tolist()[:3] == [127, 127, 127]
    back = np.asarray(q_i8, np.float32) * np.asarray(scale)[:, None]
    assert (np.abs(back - q32) <= np.asarray(scale)[:, None] / 2 + 1e-7).all()  # within half a step
    assert not np.asarray(q_i8)[3].any()  # a zero row stays zero


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown int8 dequant mode"):
        int8_dequant.check("fast")


def _split_kernel(x_ref, lo_ref, hi_ref):
    lo_ref[...], hi_ref[...] = int8_dequant.split_pairs(x_ref[...], jnp.float16, interpret=not ON_GPU)


def test_every_int8_pair_splits_exactly():
    """int16 lanes holding two int8 head-dim columns (low byte first) → their even and odd columns as fp16, for
    every int8 value in either byte (inline PTX on the GPU, shifts in interpret mode)."""
    lo = np.random.default_rng(7).permutation(np.arange(-128, 128)).astype(np.int8).reshape(16, 16)
    hi = np.random.default_rng(8).permutation(np.arange(-128, 128)).astype(np.int8).reshape(16, 16)
    pairs = int8_dequant.as_pairs(jnp.asarray(np.stack([lo, hi], axis=-1).reshape(16, 32)))
    shape = jax.ShapeDtypeStruct((16, 16), jnp.float16)
    even, odd = pl.pallas_call(_split_kernel, out_shape=(shape, shape), compiler_params=pltriton.CompilerParams(),
                               interpret=not ON_GPU)(pairs)
    np.testing.assert_array_equal(np.asarray(even, np.float32), lo.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(odd, np.float32), hi.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(int8_dequant.from_pairs(pairs)), np.stack([lo, hi], -1).reshape(16, 32))
