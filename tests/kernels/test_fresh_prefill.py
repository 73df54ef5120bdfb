"""int8 KV prefill through the 16-bit kernel (kernels/pallas/fresh_prefill.py) against reference.py's int8
attention over the cache: ragged rows with and without a cached prefix, both int8 layouts, the per-layer
options; without any prefix no int8 value is read, with one the prefix's are. Pallas interpret mode on the CPU,
the compiled kernels on a GPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas import attention_triton, fresh_prefill, int8_dequant, plan, reference
from tests.kernels.conftest import Case
from tests.kernels.test_attention_triton import INTERPRET, SCALE, _chunks_case, _options, reference_call, rel_err

# Small blocks (several per row), the causal mask on the diagonal key blocks only, as the engine's prefill runs.
LAUNCH = attention_triton.Launch(block_k=16, num_warps=4, num_stages=2, rows=16, diagonal_mask=True)


def _prefill(rng, chunks, head_dim, dtype, dequant, options, corrupt_cache=False):
    """The kernel and the reference over `chunks` = [(cached, new)] per row, GQA 4 query heads on 2 KV heads:
    the cache holds every key quantised (`corrupt_cache`: negated, for the kernel only), the new tokens' keys
    also come as computed."""
    case, positions, token_req, starts, lens = _chunks_case(rng, chunks, 2, head_dim, width=64)
    n = len(positions)
    q = jnp.asarray(rng.standard_normal((n, 4, head_dim)), dtype)
    k, v = jnp.asarray(case.k), jnp.asarray(case.v)
    own_slots = np.concatenate([case.table[r, s:s + c] for r, (s, c) in enumerate(chunks)])
    (k8, ks), (v8, vs) = reference.quantize_kv(k), reference.quantize_kv(v)
    store = int8_dequant.as_pairs if dequant == "pairs" else (lambda x: x)
    k_read, v_read = (store(-x if corrupt_cache else x) for x in (k8, v8))
    meta = [jnp.asarray(a, jnp.int32) for a in (positions, token_req, starts, lens)]
    table = jnp.asarray(case.table)
    out = fresh_prefill.prefill_attention(
        q, k[own_slots].astype(dtype), v[own_slots].astype(dtype), k_read, v_read, ks, vs, meta[0], *meta[2:],
        table, scale=SCALE, launch=LAUNCH, dequant=dequant, interpret=INTERPRET, **options)
    ref = reference_call(reference.paged_attention_int8, q, k8, v8, ks, vs, meta[1], meta[0], table, SCALE,
                         **options)
    return out, ref


@pytest.mark.parametrize("dequant,everything,dtype,head_dim,tol", [
    ("pairs", False, jnp.bfloat16, 128, 1e-2),
    ("cast", True, jnp.float32, 64, 1e-5),
])
def test_rows_with_and_without_a_prefix_match_reference(rng, dequant, everything, dtype, head_dim, tol):
    # A new prompt, a splitfuse chunk after 30 cached tokens, a prompt-cache hit with 3 new tokens, a decode row.
    chunks = [(0, 21), (30, 9), (9, 3), (40, 1)]
    out, ref = _prefill(rng, chunks, head_dim, dtype, dequant, _options(rng, 4, everything))
    assert out.shape == ref.shape and out.dtype == dtype and rel_err(out, ref) < tol


def test_without_a_prefix_no_int8_value_is_read(rng):
    """New prompts only: a corrupted int8 cache changes nothing; after a prefix it does."""
    fresh_only = [(0, 21), (0, 9), (0, 2)]
    out, ref = _prefill(rng, fresh_only, 64, jnp.float32, "pairs", {}, corrupt_cache=True)
    assert rel_err(out, ref) < 1e-5
    out, ref = _prefill(rng, [(0, 21), (12, 9)], 64, jnp.float32, "pairs", {}, corrupt_cache=True)
    assert rel_err(out, ref) > 1e-2


def test_key_limit_hides_the_columns_past_it(rng):
    """`paged_attention(key_limit=...)`: each row sees its table columns below its limit, as a table that ends
    there would show them."""
    case = Case(rng, [40, 25], 2, 64, width=48)
    k, v = jnp.asarray(case.k), jnp.asarray(case.v)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    positions, limits = jnp.asarray([39, 24], jnp.int32), jnp.asarray([17, 25], jnp.int32)
    out = attention_triton.paged_attention(q, k, v, positions, jnp.asarray(case.table), plan.decode_blocks(2),
                                           scale=SCALE, block_q=1, block_k=16, owns_all_tokens=True,
                                           key_limit=limits, interpret=INTERPRET)
    ref = reference_call(reference.decode_attention, q, k, v, jnp.asarray(case.table), limits, SCALE)
    assert rel_err(out, ref) < 1e-5
