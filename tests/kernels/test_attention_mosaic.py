"""The Mosaic GPU paged attention kernel against reference.py, on the GPU only (Pallas' GPU interpreter has no
transposed WGMMA operand); docs/perf.md records the H100 run. Tables mix contiguous key blocks (one TMA each)
and scattered ones (one TMA per token), with a padding row on the scratch slot."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from kernels.pallas import attention_mosaic, plan, reference
from tests.kernels.conftest import Case
from tests.kernels.test_attention_triton import SCALE, _chunks_case, reference_call, rel_err


@pytest.mark.parametrize(
    "kv_heads,group,head_dim,contiguous,splits",
    [
        (4, 1, 128, True, 1),  # MHA
        (2, 4, 128, True, 3),  # GQA, split-K
        (2, 4, 64, False, 1),  # every key block scattered
        (1, 3, 64, True, 2),  # SmolLM2's group of 3
    ],
)
def test_decode_matches_reference(rng, kv_heads, group, head_dim, contiguous, splits):
    lengths = [300, 0, 129, 1, 64, 200]  # row 1 pads: context 1 on the scratch slot
    case = Case(rng, lengths, kv_heads, head_dim, width=320, contiguous=contiguous)
    q = jnp.asarray(rng.standard_normal((len(lengths), kv_heads * group, head_dim)), jnp.bfloat16)
    k, v = jnp.asarray(case.k, jnp.bfloat16), jnp.asarray(case.v, jnp.bfloat16)
    ctx = jnp.asarray(case.lengths, jnp.int32)
    table = jnp.asarray(case.table)
    out = attention_mosaic.paged_attention(
        q, k, v, ctx - 1, table, plan.decode_blocks(len(lengths)), scale=SCALE, splits=splits
    )
    ref = reference_call(reference.decode_attention, q, k, v, table, ctx, SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("kv_heads,group,head_dim", [(2, 1, 128), (2, 4, 128), (1, 3, 64)])
def test_prefill_matches_reference(rng, kv_heads, group, head_dim):
    chunks = [(0, 150), (200, 70), (9, 3), (300, 1)]
    case, positions, token_req, starts, lens = _chunks_case(rng, chunks, kv_heads, head_dim, width=320)
    n = len(positions)
    q = jnp.asarray(rng.standard_normal((n, kv_heads * group, head_dim)), jnp.bfloat16)
    k, v = jnp.asarray(case.k, jnp.bfloat16), jnp.asarray(case.v, jnp.bfloat16)
    blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), n, attention_mosaic.ROWS // group)
    out = attention_mosaic.paged_attention(
        q, k, v, jnp.asarray(positions), jnp.asarray(case.table), blocks, scale=SCALE
    )
    ref = reference_call(
        reference.paged_attention, q, k, v, jnp.asarray(token_req), jnp.asarray(positions),
        jnp.asarray(case.table), SCALE,
    )
    assert rel_err(out, ref) < 1e-2
