"""Multi-head latent attention (DeepSeek-V2) in the latent space as a Pallas kernel lowered through Triton.

The cache holds one row per token, its compressed latent [kv_rank] then its rotary key [rope_dim], shared by
every head. Each query row comes with the key up-projection absorbed ([kv_rank] latent query) and its rotary
query [rope_dim]: a score is q_latent · latent + q_rope · rotary key, a value is the row's latent, and the
output [kv_rank] leaves the value up-projection to the caller (`reference.latent_attention` is the plain-JAX
form). A program owns (query block, block of heads, key split): its rows are the block's tokens × its heads,
all reading the same cache rows, so every cache byte is read once per program. Decode has one token per
block and splits its keys (flash-decoding) when too few programs would fill the GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import plan, splitk

_LOG2E = math.log2(math.e)
HEAD_BLOCK = 16  # heads per program: keeps the [rows, kv_rank] float32 accumulator in registers


def fits(kv_rank: int, rope_dim: int) -> bool:
    """Whether the kernel takes these sizes: both powers of two ≥ 16 (Triton's block shapes)."""
    return all(size >= 16 and size & (size - 1) == 0 for size in (kv_rank, rope_dim))


def _cols(ref, rows, start: int, width: int):
    """ref.at[rows, start:start + width] spelled with broadcast index arrays (masked loads need that)."""
    return ref.at[rows[:, None], start + jnp.arange(width, dtype=jnp.int32)[None, :]]


def _kernel(blk_row_ref, blk_start_ref, blk_count_ref, positions_ref, table_ref, q_ref, cache_ref, *out_refs,
            heads: int, head_block: int, rows_m: int, block_q: int, block_k: int, kv_rank: int, rope_dim: int,
            split_len: int, num_tokens: int, scale: float, split: bool):
    b, hb, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row, start, count = blk_row_ref[b], blk_start_ref[b], blk_count_ref[b]
    r = jnp.arange(rows_m, dtype=jnp.int32)  # program row = (token i of the block, head g of the head block)
    i, g = r // head_block, r % head_block
    valid = (i < count) & (i < block_q)
    token = start + jnp.minimum(i, jnp.maximum(count - 1, 0))  # invalid rows reuse a real token (never stored)
    q_idx = token * heads + hb * head_block + g
    q_lat = pltriton.load(_cols(q_ref, q_idx, 0, kv_rank), mask=valid[:, None], other=0)  # [M, R]
    q_rot = pltriton.load(_cols(q_ref, q_idx, kv_rank, rope_dim), mask=valid[:, None], other=0)  # [M, P]
    pos = positions_ref[token]
    last_pos = positions_ref[start + jnp.maximum(count - 1, 0)]
    lo = s * split_len
    hi = jnp.where(count > 0, jnp.minimum(lo + split_len, last_pos + 1), lo)
    num_kb = jnp.maximum(hi - lo + block_k - 1, 0) // block_k
    exact = None if q_lat.dtype != jnp.float32 else False  # float32 inputs: no TF32

    def body(kb, carry):
        acc, m, l = carry
        col0 = lo + kb * block_k
        cols = col0 + jnp.arange(block_k, dtype=jnp.int32)
        slots = table_ref[row, pl.ds(col0, block_k)]
        latent = pltriton.load(_cols(cache_ref, slots, 0, kv_rank))  # [T, R]
        rot = pltriton.load(_cols(cache_ref, slots, kv_rank, rope_dim))  # [T, P]
        scores = pltriton.dot(q_lat, latent, trans_b=True, allow_tf32=exact)
        scores = (scores + pltriton.dot(q_rot, rot, trans_b=True, allow_tf32=exact)) * (scale * _LOG2E)
        visible = (cols[None, :] <= pos[:, None]) & (cols[None, :] < hi)
        scores = jnp.where(visible, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(scores - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        pv = pltriton.dot(p.astype(latent.dtype), latent, allow_tf32=exact)  # [M, R]
        return acc * alpha[:, None] + pv, m_new, l * alpha + p.sum(axis=1)

    init = (jnp.zeros((rows_m, kv_rank), jnp.float32), jnp.full((rows_m,), -jnp.inf, jnp.float32),
            jnp.zeros((rows_m,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_kb, body, init)
    safe_l = jnp.where(l > 0, l, 1.0)
    out = acc / safe_l[:, None]
    o_ref = out_refs[0]
    # Invalid rows store (masked) past the end, never onto a valid row's index (interpret mode writes masked lanes).
    if not split:
        dst = jnp.where(valid, q_idx, o_ref.shape[0] + r)
        pltriton.store(_cols(o_ref, dst, 0, kv_rank), out.astype(o_ref.dtype), mask=valid[:, None])
        return
    lse_ref = out_refs[1]
    dst = jnp.where(valid, s * (num_tokens * heads) + q_idx, o_ref.shape[0] + r)
    pltriton.store(_cols(o_ref, dst, 0, kv_rank), out, mask=valid[:, None])
    pltriton.store(lse_ref.at[dst], jnp.where(l > 0, m + jnp.log2(safe_l), -jnp.inf), mask=valid)


def latent_attention(q, cache, positions, slot_table, blocks: plan.QueryBlocks, *, kv_rank: int, scale: float,
                     block_q: int, block_k: int = 32, splits: int = 1, head_block: int | None = None,
                     num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Causal latent attention of packed query tokens over their rows' cached rows (already written).

    q [n, heads, kv_rank + rope_dim]; cache [slots + 1, 1, kv_rank + rope_dim] (the last slot the scratch one);
    `blocks` from plan.decode_blocks / plan.ragged_blocks with the same `block_q`. Token t of a block sees
    table columns 0..positions[t]; tokens outside every block come back as zeros. kv_rank and rope_dim must be
    powers of two ≥ 16 (DeepSeek-V2: 512 and 64). Returns [n, heads, kv_rank] in q's dtype.
    """
    n, heads, dim = q.shape
    rope_dim = dim - kv_rank
    if not fits(kv_rank, rope_dim):
        raise ValueError(f"kv_rank {kv_rank} and rope_dim {rope_dim} must be powers of two ≥ 16 for the latent "
                         "attention kernel")
    if cache.shape[1:] != (1, dim):
        raise ValueError(f"cache rows {cache.shape[1:]} do not match the query's {dim} dims")
    head_block = head_block or plan.pow2_divisor(heads, HEAD_BLOCK, 1)
    if head_block is None or heads % head_block:
        raise ValueError(f"{heads} heads are not a multiple of the head block {head_block}")
    rows_m = max(16, 1 << max(0, (block_q * head_block - 1).bit_length()))
    num_slots = cache.shape[0]
    table = plan.pad_table(slot_table, block_k, num_slots - 1)
    split_len = plan.split_length(table.shape[1], splits, block_k)
    kernel = functools.partial(
        _kernel, heads=heads, head_block=head_block, rows_m=rows_m, block_q=block_q, block_k=block_k,
        kv_rank=kv_rank, rope_dim=rope_dim, split_len=split_len, num_tokens=n, scale=scale, split=splits > 1,
    )
    if splits > 1:
        out_shape = (jax.ShapeDtypeStruct((splits * n * heads, kv_rank), jnp.float32),
                     jax.ShapeDtypeStruct((splits * n * heads,), jnp.float32))
        inits = (jnp.zeros(out_shape[0].shape, jnp.float32), jnp.full(out_shape[1].shape, -jnp.inf, jnp.float32))
    else:
        out_shape = (jax.ShapeDtypeStruct((n * heads, kv_rank), q.dtype),)
        inits = (jnp.zeros(out_shape[0].shape, q.dtype),)
    args = (blocks.row, blocks.start, blocks.count, positions.astype(jnp.int32), table,
            q.reshape(n * heads, dim), cache.reshape(num_slots, dim))
    outs = pl.pallas_call(
        # The aliased initial outputs (zeros: tokens no block owns; -inf: splits that saw no key) sit between
        # the inputs and the outputs; the kernel never reads them.
        lambda *refs: kernel(*refs[: len(args)], *refs[len(args) + len(inits):]),
        out_shape=out_shape,
        grid=(blocks.row.shape[0], heads // head_block, splits),
        input_output_aliases={len(args) + j: j for j in range(len(inits))},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="latent_attention",
    )(*args, *inits)
    if splits == 1:
        return outs[0].reshape(n, heads, kv_rank)
    o_part, lse = outs
    return splitk.combine(o_part.reshape(splits, n, heads, kv_rank), lse.reshape(splits, n, heads)).astype(q.dtype)
