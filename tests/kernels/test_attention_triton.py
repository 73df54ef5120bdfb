"""The Triton-lowered paged attention kernel against reference.py, in Pallas interpret mode on the CPU:
decode (one and several key splits), ragged prefill over cached prefixes, MHA and GQA, head dims 64 and
128, bf16/float32 and int8 caches, with a padding row on the scratch slot. On a GPU the compiled kernel."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.pallas import attention_triton, int8_dequant, plan, reference
from tests.kernels.conftest import Case

SCALE = 0.3
INTERPRET = jax.default_backend() == "cpu"  # compiled on the GPU, interpreted on the CPU


def reference_call(fn, *args, **options):
    """The reference in full float32 (the GPU's default float32 matmul is TF32)."""
    with jax.default_matmul_precision("highest"):
        return fn(*args, **options)


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize(
    "kv_heads,group,head_dim,dtype,splits",
    [
        (4, 1, 64, jnp.float32, 1),  # MHA
        (2, 4, 128, jnp.bfloat16, 1),  # GQA
        (1, 3, 64, jnp.float32, 3),  # MQA-like group of 3 (SmolLM2's), split-K
        (2, 4, 128, jnp.bfloat16, 2),
    ],
)
def test_decode_matches_reference(rng, kv_heads, group, head_dim, dtype, splits):
    lengths = [37, 0, 70, 1, 16]  # row 1 pads: context 1 on the scratch slot
    case = Case(rng, lengths, kv_heads, head_dim, width=80)
    heads = kv_heads * group
    q = jnp.asarray(rng.standard_normal((len(lengths), heads, head_dim)), dtype)
    k, v = jnp.asarray(case.k, dtype), jnp.asarray(case.v, dtype)
    ctx = jnp.asarray(case.lengths, jnp.int32)
    out = attention_triton.paged_attention(
        q, k, v, ctx - 1, jnp.asarray(case.table), plan.decode_blocks(len(lengths)), scale=SCALE,
        block_q=1, block_k=16, splits=splits, owns_all_tokens=splits > 1, interpret=INTERPRET,
    )
    ref = reference_call(reference.decode_attention, q, k, v, jnp.asarray(case.table), ctx, SCALE)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def _chunks_case(rng, chunks, kv_heads, head_dim, width):
    """Rows bringing `(start, count)` new tokens after `start` cached ones; returns case and packed metadata."""
    case = Case(rng, [s + c for s, c in chunks], kv_heads, head_dim, width)
    positions = np.concatenate([np.arange(s, s + c) for s, c in chunks]).astype(np.int32)
    token_req = np.concatenate([[r] * c for r, (s, c) in enumerate(chunks)]).astype(np.int32)
    lens = np.array([c for _, c in chunks], np.int32)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int32)
    return case, positions, token_req, starts, lens


@pytest.mark.parametrize(
    "kv_heads,group,head_dim,dtype,block_q,diagonal_mask",
    [
        (2, 1, 64, jnp.float32, 8, False),  # MHA
        (2, 4, 128, jnp.bfloat16, 4, False),  # GQA: 4 tokens × 4 heads per program
        (1, 3, 64, jnp.float32, 5, False),  # group of 3, blocks that straddle nothing
        (2, 4, 128, jnp.bfloat16, 4, True),  # the mask on the diagonal key blocks only
        (1, 3, 64, jnp.float32, 5, True),
    ],
)
def test_prefill_matches_reference(rng, kv_heads, group, head_dim, dtype, block_q, diagonal_mask):
    # New prompts, a splitfuse chunk after 50 cached tokens, a prompt-cache hit with 3 new tokens, a decode.
    chunks = [(0, 21), (50, 13), (9, 3), (30, 1)]
    case, positions, token_req, starts, lens = _chunks_case(rng, chunks, kv_heads, head_dim, width=64)
    n, heads = len(positions), kv_heads * group
    q = jnp.asarray(rng.standard_normal((n, heads, head_dim)), dtype)
    k, v = jnp.asarray(case.k, dtype), jnp.asarray(case.v, dtype)
    blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), n, block_q)
    out = attention_triton.paged_attention(
        q, k, v, jnp.asarray(positions), jnp.asarray(case.table), blocks, scale=SCALE,
        block_q=block_q, block_k=16, interpret=INTERPRET, diagonal_mask=diagonal_mask,
    )
    ref = reference_call(
        reference.paged_attention, q, k, v, jnp.asarray(token_req), jnp.asarray(positions),
        jnp.asarray(case.table), SCALE,
    )
    assert rel_err(out, ref) < TOL[dtype]


def test_prefill_leaves_unowned_tokens_zero(rng):
    """Padding tokens after the rows' chunks belong to no block: they come back as zeros, never garbage."""
    chunks = [(0, 5), (3, 2)]
    case, positions, token_req, starts, lens = _chunks_case(rng, chunks, 1, 64, width=16)
    n = len(positions) + 3  # three padding tokens at the end
    positions = np.concatenate([positions, np.zeros(3, np.int32)])
    q = jnp.asarray(rng.standard_normal((n, 2, 64)), jnp.float32)
    blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), n, 4)
    out = attention_triton.paged_attention(
        q, jnp.asarray(case.k), jnp.asarray(case.v), jnp.asarray(positions), jnp.asarray(case.table), blocks,
        scale=SCALE, block_q=4, block_k=16, interpret=INTERPRET,
    )
    assert np.all(np.asarray(out[-3:]) == 0)
    ref = reference_call(
        reference.paged_attention, q[:-3], jnp.asarray(case.k), jnp.asarray(case.v), jnp.asarray(token_req),
        jnp.asarray(positions[:-3]), jnp.asarray(case.table), SCALE,
    )
    assert rel_err(out[:-3], ref) < 1e-5


@pytest.mark.parametrize("head_dim,splits", [(64, 1), (128, 2)])
def test_int8_decode_matches_reference(rng, head_dim, splits):
    lengths = [45, 0, 3]
    case = Case(rng, lengths, 2, head_dim, width=48)
    k8, ks = reference.quantize_kv(jnp.asarray(case.k))
    v8, vs = reference.quantize_kv(jnp.asarray(case.v))
    q = jnp.asarray(rng.standard_normal((3, 8, head_dim)), jnp.bfloat16)
    ctx = jnp.asarray(case.lengths, jnp.int32)
    table = jnp.asarray(case.table)
    out = attention_triton.paged_attention(
        q, k8, v8, ctx - 1, table, plan.decode_blocks(3), scale=SCALE, block_q=1, block_k=16, splits=splits,
        k_scale=ks, v_scale=vs, interpret=INTERPRET,
    )
    ref = reference_call(reference.decode_attention_int8, q, k8, v8, ks, vs, table, ctx, SCALE)
    assert rel_err(out, ref) < 1e-2


def _as_quantised_queries(q):
    """The queries "qk8" multiplies: each (token, head) row rounded to int8 steps of max|row| / 127."""
    q32 = np.asarray(q, np.float32)
    scale = np.abs(q32).max(axis=-1, keepdims=True) / 127
    return jnp.asarray(np.floor(q32 / np.where(scale > 0, scale, 1) + 0.5) * scale)


@pytest.mark.parametrize("dequant", int8_dequant.MODES)
@pytest.mark.parametrize("decode", [True, False])
def test_int8_dequant_modes_match_reference(rng, dequant, decode):
    """Every way of making dot operands of an int8 cache, bf16 queries (GQA 4, head dim 128), ragged rows with a
    padding row (decode, split-K 2) or chunks after cached prefixes (prefill); "qk8" against the reference
    fed the queries it quantises."""
    if decode:
        lengths = [45, 0, 29]
        case = Case(rng, lengths, 2, 128, width=48)
        positions, token_req = np.asarray(case.lengths) - 1, np.arange(3)
        blocks, block_q, splits = plan.decode_blocks(3), 1, 2
    else:
        case, positions, token_req, starts, lens = _chunks_case(rng, [(0, 9), (20, 6)], 2, 128, width=32)
        block_q, splits = 4, 1
        blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), len(positions), block_q)
    k8, ks = reference.quantize_kv(jnp.asarray(case.k))
    v8, vs = reference.quantize_kv(jnp.asarray(case.v))
    # Scores spread wide enough that "qk8" misses an unquantised reference by ~1.4e-2 (sharp softmax).
    q = jnp.asarray(3 * rng.standard_normal((len(positions), 8, 128)), jnp.bfloat16)
    table = jnp.asarray(case.table)
    store = int8_dequant.as_pairs if dequant == "pairs" else (lambda x: x)
    out = attention_triton.paged_attention(
        q, store(k8), store(v8), jnp.asarray(positions, jnp.int32), table, blocks, scale=SCALE, block_q=block_q,
        block_k=32,
        splits=splits, owns_all_tokens=decode and splits > 1, k_scale=ks, v_scale=vs, dequant=dequant,
        interpret=INTERPRET,
    )
    q_ref = _as_quantised_queries(q) if dequant == "qk8" else q
    ref = reference_call(reference.paged_attention_int8, q_ref, k8, v8, ks, vs, jnp.asarray(token_req),
                         jnp.asarray(positions, jnp.int32), table, SCALE)
    assert out.dtype == jnp.bfloat16 and rel_err(out, ref) < 5e-3  # bf16 output rounding: ~3e-3


def test_pairs_refuse_an_int8_cache_and_the_others_a_paired_one(rng):
    case = Case(rng, [5], 2, 64, width=16)
    k8, ks = reference.quantize_kv(jnp.asarray(case.k))
    q = jnp.asarray(rng.standard_normal((1, 4, 64)), jnp.bfloat16)
    call = functools.partial(attention_triton.paged_attention, q, positions=jnp.asarray([4], jnp.int32),
                             slot_table=jnp.asarray(case.table), blocks=plan.decode_blocks(1), scale=SCALE, block_q=1,
                             block_k=16, k_scale=ks, v_scale=ks, interpret=INTERPRET)
    with pytest.raises(ValueError, match="int16 pairs"):
        call(k_cache=k8, v_cache=k8, dequant="pairs")
    with pytest.raises(ValueError, match="int16 pairs"):
        call(k_cache=int8_dequant.as_pairs(k8), v_cache=int8_dequant.as_pairs(k8), dequant="f16")


def test_int8_prefill_matches_reference(rng):
    chunks = [(0, 9), (20, 6)]
    case, positions, token_req, starts, lens = _chunks_case(rng, chunks, 2, 64, width=32)
    k8, ks = reference.quantize_kv(jnp.asarray(case.k))
    v8, vs = reference.quantize_kv(jnp.asarray(case.v))
    n = len(positions)
    q = jnp.asarray(rng.standard_normal((n, 4, 64)), jnp.float32)
    blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), n, 4)
    out = attention_triton.paged_attention(
        q, k8, v8, jnp.asarray(positions), jnp.asarray(case.table), blocks, scale=SCALE, block_q=4,
        block_k=16, k_scale=ks, v_scale=vs, interpret=INTERPRET,
    )
    ref = reference_call(
        reference.paged_attention_int8, q, k8, v8, ks, vs, jnp.asarray(token_req), jnp.asarray(positions),
        jnp.asarray(case.table), SCALE,
    )
    assert rel_err(out, ref) < 1e-5


# Per-layer options of the families (Gemma-2's window and soft-cap, Bloom's ALiBi, Phi-3's head_dim 96); few
# cases, as interpret mode is slow: a window alone, and everything at once.
def _options(rng, heads, everything: bool):
    if not everything:
        return dict(window=7, softcap=None, alibi_slopes=None)
    return dict(window=20, softcap=3.0, alibi_slopes=jnp.asarray(rng.uniform(0.05, 0.5, heads), jnp.float32))


@pytest.mark.parametrize(
    "head_dim,dtype,splits,everything", [(64, jnp.float32, 1, False), (96, jnp.bfloat16, 2, True)]
)
def test_decode_options_match_reference(rng, head_dim, dtype, splits, everything):
    lengths = [37, 0, 50, 5]
    case = Case(rng, lengths, 2, head_dim, width=64)
    q = jnp.asarray(rng.standard_normal((len(lengths), 4, head_dim)), dtype)
    k, v = jnp.asarray(case.k, dtype), jnp.asarray(case.v, dtype)
    ctx, table = jnp.asarray(case.lengths, jnp.int32), jnp.asarray(case.table)
    options = _options(rng, 4, everything)
    out = attention_triton.paged_attention(
        q, k, v, ctx - 1, table, plan.decode_blocks(len(lengths)), scale=SCALE, block_q=1, block_k=16,
        splits=splits, owns_all_tokens=splits > 1, interpret=INTERPRET, **options,
    )
    ref = reference_call(reference.decode_attention, q, k, v, table, ctx, SCALE, **options)
    assert out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("head_dim,int8,everything", [(96, False, True), (64, True, True), (64, False, False)])
def test_prefill_options_match_reference(rng, head_dim, int8, everything):
    chunks = [(0, 21), (30, 9), (9, 3)]
    case, positions, token_req, starts, lens = _chunks_case(rng, chunks, 2, head_dim, width=48)
    n = len(positions)
    q = jnp.asarray(rng.standard_normal((n, 4, head_dim)), jnp.float32)
    k, v = jnp.asarray(case.k), jnp.asarray(case.v)
    options = _options(rng, 4, everything)
    blocks = plan.ragged_blocks(jnp.asarray(starts), jnp.asarray(lens), n, 8)
    args = (jnp.asarray(token_req), jnp.asarray(positions), jnp.asarray(case.table), SCALE)
    if int8:
        (k, ks), (v, vs) = reference.quantize_kv(k), reference.quantize_kv(v)
        scales = dict(k_scale=ks, v_scale=vs)
        ref = reference_call(reference.paged_attention_int8, q, k, v, ks, vs, *args, **options)
    else:
        scales = {}
        ref = reference_call(reference.paged_attention, q, k, v, *args, **options)
    out = attention_triton.paged_attention(
        q, k, v, jnp.asarray(positions), jnp.asarray(case.table), blocks, scale=SCALE, block_q=8, block_k=16,
        interpret=INTERPRET, **scales, **options,
    )
    assert rel_err(out, ref) < 1e-5


def test_decode_launch_runs_short_tables_short_keeping_the_caches_dequant():
    """Short slot tables over enough programs take DECODE_SHORT's blocks with the long launch's dequant (an int8
    cache's layout follows it); long tables, or too few programs to fill the machine twice, keep the long one."""
    many, few = 2 * plan.num_sms(), 2 * plan.num_sms() - 1
    width = attention_triton.SHORT_DECODE_WIDTH
    short = attention_triton.decode_launch(width, many, attention_triton.DECODE_INT8)
    assert (short.block_k, short.num_warps, short.num_stages) == (32, 2, 3)
    assert short.dequant == attention_triton.DECODE_INT8.dequant == "pairs"
    assert attention_triton.decode_launch(width, many) == attention_triton.DECODE_SHORT
    assert attention_triton.decode_launch(2 * width, many, attention_triton.DECODE_INT8) == attention_triton.DECODE_INT8
    assert attention_triton.decode_launch(width, few, attention_triton.DECODE_INT8) == attention_triton.DECODE_INT8
    assert attention_triton.decode_launch(width, few) == attention_triton.DECODE
