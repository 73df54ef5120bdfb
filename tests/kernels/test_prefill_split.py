"""`prefill_split.py` on the CPU: the paged kernel's log-sum-exp output (Pallas interpret mode) against a
plain-JAX log-sum-exp, and the whole split (dense own-token part + paged prefix part, merged) against
reference.py's paged attention over scattered slots: the prefix through the paged kernel (rows with and
without one), or gathered into a dense array, or none. The dense part here is
`dense_reference`; `dense_mgpu` (Mosaic GPU, no interpret mode) is tested where a GPU is the backend
(`JAX_PLATFORMS=cuda python3 -m pytest -q tests/kernels/test_prefill_split.py`) and timed by
`python -m kernels.pallas.bench --dense`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas import attention_triton, plan, prefill_split, reference
from tests.kernels.conftest import Case

SCALE = 0.3
INTERPRET = jax.default_backend() == "cpu"
SMALL = attention_triton.Launch(block_k=16, num_warps=4, num_stages=2, rows=16)


def _rows(rng, prefixes, new, kv_heads, head_dim, group):
    """Rows of `prefix + new` keys over scattered slots, and their `new` query tokens (packed)."""
    case = Case(rng, [p + new for p in prefixes], kv_heads, head_dim, width=-(-(max(prefixes) + new) // 16) * 16)
    q = jnp.asarray(rng.standard_normal((len(prefixes), new, kv_heads * group, head_dim)), jnp.float32)
    return case, q


def _reference(case, q, k, v, prefixes):
    """reference.py's paged attention of the packed queries q [rows, new, heads, head_dim] over the rows' slots
    (row r's new tokens at positions prefixes[r]..), in full float32."""
    rows, new, heads, head_dim = q.shape
    positions = np.concatenate([np.arange(p, p + new) for p in prefixes])
    with jax.default_matmul_precision("highest"):
        return reference.paged_attention(
            q.reshape(rows * new, heads, head_dim), k, v, jnp.asarray(np.repeat(np.arange(rows), new)),
            jnp.asarray(positions), jnp.asarray(case.table), SCALE,
        )


def test_paged_kernel_returns_its_log_sum_exp(rng):
    prefixes, new, kv_heads, group, head_dim = [0, 9, 30], 5, 2, 2, 64
    case, q = _rows(rng, prefixes, new, kv_heads, head_dim, group)
    n, heads = q.shape[0] * new, kv_heads * group
    positions = np.concatenate([np.arange(p, p + new) for p in prefixes]).astype(np.int32)
    blocks = plan.ragged_blocks(jnp.arange(3, dtype=jnp.int32) * new, jnp.full((3,), new, jnp.int32), n, 4)
    out, lse = attention_triton.paged_attention(
        q.reshape(n, heads, head_dim), jnp.asarray(case.k), jnp.asarray(case.v), jnp.asarray(positions),
        jnp.asarray(case.table), blocks, scale=SCALE, block_q=4, block_k=16, interpret=INTERPRET, return_lse=True,
    )
    row = np.repeat(np.arange(3), new)
    keys = case.k[case.table[row]]  # [n, width, kv_heads, head_dim]
    qg = np.asarray(q).reshape(n, kv_heads, group, head_dim)
    scores = np.einsum("nkgd,ntkd->nkgt", qg, keys) * SCALE
    visible = np.arange(case.table.shape[1])[None, :] <= positions[:, None]  # [n, width]
    scores = np.where(visible[:, None, None, :], scores, -np.inf)
    expected = np.logaddexp.reduce(scores, axis=-1).reshape(n, heads) / np.log(2)
    assert out.dtype == jnp.float32 and lse.shape == (n, heads)
    np.testing.assert_allclose(np.asarray(lse), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "prefixes,gathered",
    [([0, 13, 40], None), ([24, 24, 24], 24), ([0, 0], 0)],  # paged prefix (ragged); gathered; none
)
def test_split_prefill_matches_reference(rng, prefixes, gathered):
    new, kv_heads, group, head_dim = 24, 2, 3, 64
    case, q = _rows(rng, prefixes, new, kv_heads, head_dim, group)
    k, v = jnp.asarray(case.k), jnp.asarray(case.v)
    own = np.stack([case.table[r, p : p + new] for r, p in enumerate(prefixes)])  # [rows, new] slots
    out = prefill_split.jitted(gathered_prefix=gathered, launch=SMALL, interpret=INTERPRET)(
        q, k[own], v[own], k, v, jnp.asarray(prefixes), jnp.asarray(case.table), scale=SCALE,
    )
    expected = _reference(case, q, k, v, prefixes)
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out).reshape(expected.shape), np.asarray(expected), atol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="attention_mgpu is Mosaic GPU (Hopper) only")
@pytest.mark.parametrize("prefixes,gathered", [([0, 100], None), ([128, 128], 128)])
def test_split_prefill_through_attention_mgpu(rng, prefixes, gathered):
    """bf16 numbers through attention_mgpu's fp16 tiles: against the float32 reference within bf16's error."""
    new, kv_heads, group, head_dim = 128, 2, 4, 128
    case, q = _rows(rng, prefixes, new, kv_heads, head_dim, group)
    q = q.astype(jnp.bfloat16)
    k, v = jnp.asarray(case.k, jnp.bfloat16), jnp.asarray(case.v, jnp.bfloat16)
    own = np.stack([case.table[r, p : p + new] for r, p in enumerate(prefixes)])
    out = prefill_split.jitted(dense=prefill_split.dense_mgpu, gathered_prefix=gathered)(
        q, k[own], v[own], k, v, jnp.asarray(prefixes), jnp.asarray(case.table), scale=SCALE,
    )
    expected = _reference(case, q, k, v, prefixes)
    err = np.asarray(out, np.float32).reshape(expected.shape) - np.asarray(expected, np.float32)
    assert np.linalg.norm(err) / np.linalg.norm(np.asarray(expected, np.float32)) < 1e-2
