"""w8a16 through XLA's int8 GEMM on x's two int8 digits (kernels/pallas/two_digit_matmul.py): the digits give x
back to within half a grid step, the product matches reference.int8_matmul as closely as our Triton kernel's
tolerance, at the sizes it serves (one row) and a few more, whatever the rows' magnitudes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import quant
from kernels.pallas import reference, two_digit_matmul


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def test_digits_give_x_back_within_half_a_step(rng):
    x = jnp.asarray(rng.standard_normal((3, 200)) * np.array([[1e-3], [1.0], [300.0]]), jnp.float32)
    x = x.at[1, 7].set(0.0).at[2, 5].set(-jnp.abs(x[2]).max() * 1.0)  # a zero, and the row's extreme negative
    digits, scale = two_digit_matmul.int16_digits(x)
    assert digits.dtype == jnp.int8 and digits.shape == (6, 200) and scale.shape == (3,)
    hi, lo = np.asarray(digits[:3], np.float32), np.asarray(digits[3:], np.float32)
    back = (256 * hi + lo) * np.asarray(scale)[:, None]
    assert np.all(np.abs(back - np.asarray(x)) <= np.asarray(scale)[:, None] / 2 * (1 + 1e-5))
    assert np.abs(256 * hi + lo).max() == two_digit_matmul.DIGIT_GRID  # the grid's whole range is used


def test_an_all_zero_row_gives_zeros(rng):
    x = jnp.zeros((1, 64), jnp.bfloat16)
    q = quant.quantize_int8(jnp.asarray(rng.standard_normal((64, 32)), jnp.float32))
    out = two_digit_matmul.int8_matmul(x, q.data, q.scale)
    assert out.dtype == jnp.bfloat16 and not np.asarray(out, np.float32).any()


@pytest.mark.parametrize("m,k,n,dtype,tol", [
    (1, 4096, 96, jnp.bfloat16, 1e-2),
    (1, 576, 1536, jnp.float32, 1e-4),
    (3, 1000, 40, jnp.float32, 1e-4),
])
def test_matches_the_w8a16_reference(rng, m, k, n, dtype, tol):
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 10.0, (m, 1)), dtype)
    q = quant.quantize_int8(jnp.asarray(rng.standard_normal((k, n)) * 0.05, jnp.float32))
    out = jax.jit(two_digit_matmul.int8_matmul)(x, q.data, q.scale)
    ref = reference.int8_matmul(x, q.data, q.scale)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) < tol


def test_sizes_whose_sums_could_overflow_are_refused():
    assert two_digit_matmul.supports(14336) and two_digit_matmul.supports(two_digit_matmul.MAX_K)
    assert not two_digit_matmul.supports(two_digit_matmul.MAX_K + 1)
    assert two_digit_matmul.MAX_K * 128 * 127 < 2**31


def _rows(rng, m, k, dtype=jnp.bfloat16):
    """Rows of very different magnitudes, one all zero when m > 2."""
    x = rng.standard_normal((m, k)) * rng.uniform(0.01, 50.0, (m, 1))
    if m > 2:
        x[1] = 0.0
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("m,k", [(1, 4096), (2, 576), (3, 14336)])
def test_normed_digits_are_those_of_the_normalised_rows(rng, m, k):
    """With a norm weight the digits stand for x / rms(x) ⊙ weight, within half a grid step, though the
    normalised rows are never formed."""
    x = _rows(rng, m, k)
    weight = jnp.asarray(rng.uniform(0.2, 3.0, k), jnp.float32)
    digits, scale = two_digit_matmul.int16_digits(x, weight, 1e-5)
    x32 = np.asarray(x, np.float32)
    normed = x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + 1e-5) * np.asarray(weight)
    back = (256 * np.asarray(digits[:m], np.float32) + np.asarray(digits[m:], np.float32)) * np.asarray(scale)[:, None]
    assert np.all(np.abs(back - normed) <= np.asarray(scale)[:, None] / 2 * (1 + 1e-4) + 1e-6)


@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("m,k", [(1, 4096), (2, 576), (3, 14336), (1, 48)])
def test_the_digits_kernel_gives_the_same_digits(rng, m, k, normed):
    """The Pallas kernel (interpret mode) writes the digits XLA's ops write, bit for bit, and the same scale up to
    the order of its float32 sums."""
    x = _rows(rng, m, k)
    weight = jnp.asarray(rng.uniform(0.2, 3.0, k), jnp.float32) if normed else None
    digits, scale = two_digit_matmul.int16_digits(x, weight, 1e-6)
    k_digits, k_scale = two_digit_matmul.int16_digits_kernel(x, weight, 1e-6, interpret=True)
    assert k_digits.dtype == jnp.int8 and k_digits.shape == (2 * m, k) and k_scale.shape == (m,)
    np.testing.assert_array_equal(np.asarray(k_digits), np.asarray(digits))
    np.testing.assert_allclose(np.asarray(k_scale), np.asarray(scale), rtol=1e-6)


def test_the_kernel_takes_rows_whose_length_has_a_power_of_two_chunk():
    assert two_digit_matmul.kernel_supports(4096) and two_digit_matmul.kernel_supports(14336)
    assert two_digit_matmul.kernel_supports(576) and not two_digit_matmul.kernel_supports(1000)
    with pytest.raises(ValueError, match="1000 inputs"):
        two_digit_matmul.int16_digits_kernel(jnp.ones((1, 1000), jnp.bfloat16), interpret=True)


def test_a_normed_product_matches_the_normalised_rows_product(rng):
    x = _rows(rng, 1, 1024)
    weight = jnp.asarray(rng.uniform(0.5, 2.0, 1024), jnp.float32)
    q = quant.quantize_int8(jnp.asarray(rng.standard_normal((1024, 64)) * 0.05, jnp.float32))
    out = jax.jit(two_digit_matmul.int8_matmul)(x, q.data, q.scale, weight, 1e-5)
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5) * weight).astype(jnp.float32)
    ref = reference.int8_matmul(normed, q.data, q.scale)
    assert out.dtype == jnp.bfloat16 and rel_err(out, ref) < 1e-2
