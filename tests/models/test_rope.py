"""apply_rope against the rotation it stands for: each pair (x1, x2) of a head's rotary dims times e^{iθ}."""

import jax
import numpy as np
import pytest

from jaxllm.models.rope import apply_rope


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim, rotary_dim", [(64, 64), (80, 40)])  # whole heads, and a partial rotary
def test_apply_rope_rotates_each_pair_by_its_angle(interleaved, head_dim, rotary_dim):
    rng = np.random.default_rng(7)
    n, heads, half = 6, 3, rotary_dim // 2
    x = rng.standard_normal((n, heads, head_dim)).astype(np.float32)
    angles = rng.uniform(-20, 20, (n, half)).astype(np.float32)
    out = np.asarray(jax.jit(apply_rope, static_argnums=3)(x, np.cos(angles), np.sin(angles), interleaved))

    if interleaved:  # pairs (2j, 2j + 1)
        first, second = np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)
    else:  # pairs (j, j + half)
        first, second = np.arange(half), np.arange(half, rotary_dim)
    rotated = (x[..., first] + 1j * x[..., second]) * np.exp(1j * angles)[:, None, :]
    np.testing.assert_allclose(out[..., first], rotated.real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[..., second], rotated.imag, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])  # the rest passes through
