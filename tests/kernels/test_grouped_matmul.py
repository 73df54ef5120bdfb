"""The Pallas grouped matmul (kernels/pallas/grouped_matmul.py) against `jax.lax.ragged_dot` on fresh random
inputs with ragged group sizes: empty groups, one row, groups longer than a tile, all rows in one group.
On the CPU the kernel runs in Pallas interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas.grouped_matmul import fitted_block, grouped_matmul

INTERPRET = jax.devices()[0].platform == "cpu"


@pytest.mark.parametrize("sizes,k,n,dtype", [
    ([0, 1, 0, 0, 0, 1, 0, 0], 64, 128, jnp.float32),  # a decode token's top-2 of 8 experts
    ([5, 6, 12, 14], 32, 64, jnp.float32),  # groups shorter and longer than a 16-row tile
    ([0, 0, 60, 0, 40, 0], 64, 256, jnp.bfloat16),  # empty groups around long ones
    ([33], 48, 32, jnp.float32),  # one group, K a multiple of block_k=16 only
])
def test_grouped_matmul_matches_ragged_dot(sizes, k, n, dtype):
    rng = np.random.default_rng(sum(sizes) + k)
    m, g = sum(sizes), len(sizes)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.standard_normal((g, k, n)) / np.sqrt(k), dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(x, w, group_sizes, block_n=32, block_k=32, interpret=INTERPRET)
    want = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), group_sizes)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol)


@pytest.mark.parametrize("sizes,dtype", [([0, 1, 0, 0, 0, 1, 0, 0], jnp.float32), ([0, 9, 30, 0, 5], jnp.bfloat16)])
def test_int8_weights_with_a_scale_match_their_plain_form(sizes, dtype):
    """int8 weights stored output-major [groups, N, K] with a scale per output channel (w8a16 experts):
    `jax.lax.ragged_dot` of the weights converted, the product scaled per its group's channels."""
    rng = np.random.default_rng(len(sizes))
    m, g, k, n = sum(sizes), len(sizes), 64, 96
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.integers(-127, 128, size=(g, n, k)), jnp.int8)
    scale = jnp.asarray(rng.random((g, n)) / 127, jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    got = grouped_matmul(x, w, group_sizes, scale=scale, block_n=32, block_k=32, interpret=INTERPRET)
    dequantised = w.astype(jnp.float32) * scale[:, :, None]  # [g, n, k]
    want = jax.lax.ragged_dot(x.astype(jnp.float32), jnp.swapaxes(dequantised, 1, 2), group_sizes)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol, rtol=tol)


def test_blocks_fit_the_matrix_or_the_shape_is_refused():
    assert fitted_block(2816, 128) == 128 and fitted_block(704, 64) == 64 and fitted_block(48, 64) == 16
    x, w = jnp.ones((4, 40)), jnp.ones((2, 40, 64))
    with pytest.raises(ValueError, match="no block of 16 or more divides 40"):
        grouped_matmul(x, w, jnp.asarray([2, 2], jnp.int32), interpret=INTERPRET)
