"""Work planning (query blocks, key splits), int8 quantisation and the split-K combine, in plain JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas import plan, reference, splitk


def test_ragged_blocks_cover_every_token_once():
    starts, lens = np.array([0, 7, 7, 20], np.int32), np.array([7, 0, 13, 1], np.int32)
    blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), 21, 4)
    owned = []
    for row, start, count in zip(*(np.asarray(a) for a in (blocks.row, blocks.start, blocks.count))):
        if count:
            assert starts[row] <= start and start + count <= starts[row] + lens[row]
            owned.extend(range(start, start + count))
    assert sorted(owned) == list(range(21))
    assert blocks.row.shape == (-(-21 // 4) + 4,)


@pytest.mark.parametrize(
    "programs,width,policy,expected",
    [
        (512, 4096, "auto", 1),  # batch 64 × 8 KV heads fills the machine
        (8, 4096, "auto", 16),  # batch 1: split as far as 256 keys per split allow
        (8, 4096, "never", 1),
        (1024, 4096, "always", 2),
        (8, 64, "always", 1),  # one key block: nothing to split
    ],
)
def test_decode_splits(programs, width, policy, expected):
    assert plan.decode_splits(programs, width, 64, policy) == expected


def test_quantize_round_trip():
    x = jax.random.normal(jax.random.key(1), (5, 3, 64)) * jnp.array([0.01, 1.0, 30.0])[None, :, None]
    x = x.at[2, 1].set(0.0)  # an all-zero vector quantises to zeros with scale 0
    x_i8, scale = reference.quantize_kv(x)
    assert x_i8.dtype == jnp.int8 and scale.shape == (5, 3)
    assert int(jnp.max(jnp.abs(x_i8.astype(jnp.int32)))) == 127
    back = reference.dequantize_kv(x_i8, scale)
    assert float(jnp.max(jnp.abs(back - x) / scale[..., None].clip(1e-30))) <= 0.5 + 1e-4
    assert float(scale[2, 1]) == 0.0 and not np.any(np.asarray(back[2, 1]))


def test_combine_equals_one_softmax_over_all_keys():
    scores = jax.random.normal(jax.random.key(2), (3, 2, 4, 40))  # [n, heads, ?, keys] split 3 ways below
    values = jax.random.normal(jax.random.key(3), (40, 8))
    full = jnp.einsum("nhxk,kd->nhxd", jax.nn.softmax(scores, -1), values)[:, :, 0]
    parts, lses = [], []
    for lo, hi in [(0, 16), (16, 32), (32, 40)]:
        s = scores[:, :, 0, lo:hi] * np.log2(np.e)
        parts.append(jnp.einsum("nhk,kd->nhd", jax.nn.softmax(scores[:, :, 0, lo:hi], -1), values[lo:hi]))
        lses.append(jax.scipy.special.logsumexp(s * np.log(2), -1) / np.log(2))
    parts.append(jnp.full_like(parts[0], 7.0))  # an empty split: its output is ignored
    lses.append(jnp.full_like(lses[0], -jnp.inf))
    out = splitk.combine(jnp.stack(parts), jnp.stack(lses))
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)
