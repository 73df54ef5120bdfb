"""The latent attention kernel (kernels/pallas/latent_attention.py) against reference.latent_attention, in
Pallas interpret mode on the CPU (compiled on a GPU): decode with one and several key splits, ragged prefill
over cached prefixes, several head blocks, float32 and bf16, scattered slots and a padding row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas import latent_attention, plan, reference
from tests.kernels.conftest import Case

SCALE = 0.2
KV_RANK, ROPE = 32, 16
INTERPRET = jax.default_backend() == "cpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _cache(rng, lengths, width, dtype):
    case = Case(rng, lengths, 1, KV_RANK + ROPE, width)
    return case, jnp.asarray(case.k, dtype)


def _expected(q, cache, token_req, positions, table):
    with jax.default_matmul_precision("highest"):
        return reference.latent_attention(q, cache, token_req, positions, table, SCALE, KV_RANK)


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("heads,head_block,dtype,splits", [
    (4, None, jnp.float32, 1),
    (8, 4, jnp.bfloat16, 1),  # two head blocks per token
    (4, None, jnp.float32, 3),  # split-K
])
def test_decode_matches_reference(rng, heads, head_block, dtype, splits):
    lengths = [37, 0, 70, 1, 16]  # row 1 pads on the scratch slot
    case, cache = _cache(rng, lengths, 80, dtype)
    rows = len(lengths)
    q = jnp.asarray(rng.standard_normal((rows, heads, KV_RANK + ROPE)), dtype)
    table = jnp.asarray(case.table)
    positions = jnp.asarray(case.lengths, jnp.int32) - 1
    out = latent_attention.latent_attention(
        q, cache, positions, table, plan.decode_blocks(rows), kv_rank=KV_RANK, scale=SCALE, block_q=1,
        block_k=16, splits=splits, head_block=head_block, interpret=INTERPRET,
    )
    ref = _expected(q, cache, jnp.arange(rows), positions, table)
    assert out.shape == (rows, heads, KV_RANK) and out.dtype == dtype
    assert _rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("heads,block_q,dtype", [(4, 4, jnp.float32), (8, 2, jnp.bfloat16)])
def test_prefill_over_cached_prefixes_matches_reference(rng, heads, block_q, dtype):
    chunks = [(0, 21), (50, 13), (9, 3), (30, 1)]  # a new prompt, a chunk after 50 cached, a cache hit, a decode
    case, cache = _cache(rng, [s + c for s, c in chunks], 64, dtype)
    positions = np.concatenate([np.arange(s, s + c) for s, c in chunks]).astype(np.int32)
    token_req = np.concatenate([[r] * c for r, (_, c) in enumerate(chunks)]).astype(np.int32)
    lens = np.array([c for _, c in chunks], np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    n = len(positions)
    q = jnp.asarray(rng.standard_normal((n, heads, KV_RANK + ROPE)), dtype)
    blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), n, block_q)
    table = jnp.asarray(case.table)
    out = latent_attention.latent_attention(
        q, cache, jnp.asarray(positions), table, blocks, kv_rank=KV_RANK, scale=SCALE, block_q=block_q,
        block_k=16, interpret=INTERPRET,
    )
    ref = _expected(q, cache, jnp.asarray(token_req), jnp.asarray(positions), table)
    assert _rel_err(out, ref) < TOL[dtype]


def test_sizes_the_kernel_cannot_take_are_refused(rng):
    q = jnp.ones((1, 4, 40 + ROPE), jnp.float32)
    cache = jnp.ones((9, 1, 40 + ROPE), jnp.float32)
    with pytest.raises(ValueError, match="kv_rank 40 and rope_dim 16 must be powers of two"):
        latent_attention.latent_attention(q, cache, jnp.zeros(1, jnp.int32), jnp.zeros((1, 16), jnp.int32),
                                          plan.decode_blocks(1), kv_rank=40, scale=1.0, block_q=1)
