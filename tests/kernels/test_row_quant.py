"""Per-token row quantisation as one Pallas kernel a row (kernels/pallas/row_quant.py): the same int8 / e4m3
values as the plain-JAX quantisers on the same rows (plain, RMS-normed with the norm's 1 / rms in the scale, gated
silu(gate) · up), ragged row counts, one chunk a row or several (the last masked), rows of every magnitude and an
all-zero row; round half to even on ties. Interpret mode on the CPU gives the same values bit for bit but for
gated rows, whose silu (1 / (1 + exp(-x)) in the kernel, jax.nn.silu's logistic here) may differ in a last bit;
compiled on a GPU exp and the division may too. A rare value then lands one step over."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas import reference, row_quant

INTERPRET = jax.default_backend() != "gpu"
QUANTISERS = {"int8": (jnp.int8, reference.quantize_rows_int8),
              "fp8": (jnp.float8_e4m3fn, reference.quantize_rows_fp8)}


def rows(rng, m: int, k: int, dtype, gated: bool = False):
    """Rows of every magnitude (1e-3 … 300), the middle one all zero where there are several."""
    shape = (m, 2, k) if gated else (m, k)
    magnitude = np.logspace(-3, np.log10(300.0), m).reshape((m,) + (1,) * (len(shape) - 1))
    x = rng.standard_normal(shape) * magnitude
    if m > 1:
        x[m // 2] = 0.0
    return jnp.asarray(x, dtype)


def plain_rows(x, norm_weight, gated: bool):
    """What the kernel quantises, in plain JAX: x, x ⊙ weight, or silu(gate) · up rounded to x's dtype."""
    x32 = x.astype(jnp.float32)
    if gated:
        return (jax.nn.silu(x32[:, 0]) * x32[:, 1]).astype(x.dtype).astype(jnp.float32)
    return x32 if norm_weight is None else x32 * norm_weight


@pytest.mark.parametrize("kind", sorted(QUANTISERS))
@pytest.mark.parametrize("form", ["plain", "normed", "gated"])
# one chunk (4096), one chunk masked past k (1792, 96), two (20480: the second masked past k)
@pytest.mark.parametrize("m,k,dtype", [(1, 4096, jnp.bfloat16), (5, 1792, jnp.bfloat16), (3, 96, jnp.float32),
                                       (2, 20480, jnp.bfloat16),
                                       pytest.param(256, 14336, jnp.bfloat16, marks=pytest.mark.skipif(
                                           INTERPRET, reason="Llama-3-8B's batch 256: on the GPU only"))])
def test_the_kernel_quantises_as_the_plain_quantisers(rng, kind, form, m, k, dtype):
    out_dtype, quantise = QUANTISERS[kind]
    x = rows(rng, m, k, dtype, gated=form == "gated")
    weight = jnp.asarray(rng.uniform(0.5, 2.0, k), jnp.float32) if form == "normed" else None
    q, scale = row_quant.quantize_rows(x, out_dtype, weight, 1e-5, gated=form == "gated", interpret=INTERPRET)
    assert q.dtype == out_dtype and q.shape == (m, k) and scale.shape == (m,) and scale.dtype == jnp.float32
    z = plain_rows(x, weight, form == "gated")
    want_q, want_scale = quantise(z)
    if form == "normed":
        x32 = x.astype(jnp.float32)
        want_scale = want_scale * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + 1e-5)
    got, want = np.asarray(q, np.float32), np.asarray(want_q, np.float32)
    if INTERPRET and form != "gated":
        np.testing.assert_array_equal(got, want)
    else:
        off = got != want
        assert off.mean() < 1e-3, f"{off.sum()} of {off.size} values differ"
        assert np.all(np.abs(got - want)[off] <= (1.0 if kind == "int8" else np.abs(want[off]) / 8 + 2**-9))
    # a gated row's largest value may differ by its bf16 rounding (the silu's last bit, above)
    np.testing.assert_allclose(np.asarray(scale), np.asarray(want_scale), rtol=2**-8 if form == "gated" else 2e-6)
    if m > 1:
        assert float(scale[m // 2]) == 0.0 and not np.asarray(q[m // 2], np.float32).any()
    largest = 127.0 if kind == "int8" else reference.FP8_MAX
    assert np.abs(np.asarray(q, np.float32)).max(axis=-1)[np.asarray(scale) > 0].min() == largest
    back = np.asarray(q, np.float32) * np.asarray(scale)[:, None]
    if form == "normed":  # the rows the product sees: x / rms ⊙ weight
        z = z * jax.lax.rsqrt(jnp.mean(x.astype(jnp.float32) ** 2, axis=-1, keepdims=True) + 1e-5)
    z = np.asarray(z)
    step = np.abs(z).max(axis=-1, keepdims=True) / largest
    # int8: half a grid step; e4m3: half an ulp (3 mantissa bits), or half the subnormals' spacing (2^-9 steps)
    bound = step / 2 if kind == "int8" else np.abs(z) / 16 + step / 1024
    if form == "gated":  # the kernel's rows may differ from z by their bf16 rounding
        bound = bound * (1 + 2**-8) + np.abs(z) * 2**-8
    assert np.all(np.abs(back - z) <= bound * (1 + 1e-5))


def test_ties_round_to_even():
    v = jnp.asarray([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.4999998, 3.5000002, 0.0, -7.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(row_quant.round_half_even(v)), np.asarray(jnp.round(v)))


def test_shapes_it_refuses():
    with pytest.raises(ValueError, match="8 inputs"):
        row_quant.quantize_rows(jnp.ones((2, 8), jnp.bfloat16), jnp.int8, interpret=INTERPRET)
    with pytest.raises(ValueError, match="int8 or float8"):
        row_quant.quantize_rows(jnp.ones((2, 64)), jnp.bfloat16, interpret=True)
    with pytest.raises(ValueError, match="gated"):
        row_quant.quantize_rows(jnp.ones((2, 64)), jnp.int8, gated=True, interpret=True)
    assert all(map(row_quant.supports, (14336, 4096, 100, 16392))) and not row_quant.supports(8)
