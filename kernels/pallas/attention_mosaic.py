"""Paged attention over the token-level KV cache as a Mosaic GPU kernel (Hopper: TMA + WGMMA), bf16/fp16 KV.

Same contract as `attention_triton.paged_attention` (decode, split-K decode, ragged causal prefill) for
float caches. A program owns (query block, KV head, key split) and 64 query rows (tokens × the KV head's
group of query heads, packed by XLA). Keys come in blocks of 64 table columns, double-buffered:
- a block whose 64 slots are consecutive from a multiple of 8 (the engine's usual case) is one TMA per K
  and V, straight into swizzled shared memory;
- any other block is gathered with one TMA per token into a staging buffer and re-laid out through
  registers (Hopper's TMA has no gather), so correctness never depends on contiguity.
Not the default: the Triton-lowered kernel (`attention_triton.py`) measured faster on the H100 in every case
(docs/perf.md, "## Attention kernels"); `PallasAttention(impl="mosaic")` selects this one. It cannot run in
interpret mode (Pallas' GPU interpreter has no `plgpu.load` and no transposed WGMMA operand):
tests/kernels/test_attention_mosaic.py runs it against reference.py where a GPU is the backend, and
docs/perf.md records the H100 run.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.pallas import plan, splitk

ROWS = 64  # query rows per program: one WGMMA M tile
BLOCK_K = 64  # keys per block
_LOG2E = math.log2(math.e)
_MASKED = -1e30  # finite: a masked score never turns the running max into NaN


def _load_wgmma(ref):
    """A staging buffer → registers in the WGMMA layout (JAX 0.11 takes no separate index any more)."""
    if inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=False)
    return plgpu.load(ref, layout=plgpu.Layout.WGMMA, optimized=False)


def _transposed(ref):
    """K^T as the WGMMA B operand (JAX 0.11 spells it `ref.transpose`)."""
    if hasattr(ref, "transpose"):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def _transforms(dtype):
    swizzle = 128
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(
    blk_ref,  # [blocks, 3] int32: row, position of the first token, token count
    first_ref,  # [rows, key blocks] int32: slot of each key block's first column
    contig_ref,  # [rows, key blocks] int32: 1 when the block's 64 slots are consecutive from a multiple of 8
    table_ref,  # [rows, width] int32
    q_ref,  # [blocks, kv_heads, 64, head_dim]
    k_ref,  # [slots + 1, kv_heads, head_dim]
    v_ref,
    *outs,  # o [blocks, kv_heads, 64, head_dim]; split-K: o f32 [splits, ...], lse [splits, blocks, kv_heads, 64]
    group: int,
    split_len: int,
    scale: float,
    split: bool,
):
    b, h, s = lax.axis_index("blk"), lax.axis_index("kvh"), lax.axis_index("split")
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    row, p0, count = blk_ref[b, 0], blk_ref[b, 1], blk_ref[b, 2]
    lo = s * split_len
    hi = jnp.where(count > 0, jnp.minimum(lo + split_len, p0 + count), lo)
    num_kb = jnp.maximum(hi - lo + BLOCK_K - 1, 0) // BLOCK_K
    kb0 = lo // BLOCK_K

    def scoped(q_smem, k_tiles, v_tiles, k_stage, v_stage, tab_smem, o_smem, lse_smem, bars):
        q_bar, fast_bars, slow_bar, tab_bar = bars

        def issue_fast(j, stage):
            g = kb0 + j

            @pl.when(contig_ref[row, g] == 1)
            def _():
                src = pl.ds(first_ref[row, g], BLOCK_K)
                plgpu.copy_gmem_to_smem(k_ref.at[src, h], k_tiles.at[stage], fast_bars.at[stage])
                plgpu.copy_gmem_to_smem(v_ref.at[src, h], v_tiles.at[stage], fast_bars.at[stage])

        def gather_slow(j, stage):
            # One TMA per token into the staging buffers, then registers → swizzled tiles.
            g = kb0 + j
            plgpu.copy_gmem_to_smem(table_ref.at[row, pl.ds(g * BLOCK_K, BLOCK_K)], tab_smem, tab_bar)
            plgpu.barrier_wait(tab_bar)

            @pl.loop(0, BLOCK_K)
            def _(t):
                slot = tab_smem[t]
                plgpu.copy_gmem_to_smem(k_ref.at[slot, h], k_stage.at[t], slow_bar)
                plgpu.copy_gmem_to_smem(v_ref.at[slot, h], v_stage.at[t], slow_bar)

            plgpu.barrier_wait(slow_bar)
            k_tiles[stage] = _load_wgmma(k_stage)
            v_tiles[stage] = _load_wgmma(v_stage)
            plgpu.commit_smem()

        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_bar)
        pl.when(num_kb > 0)(lambda: issue_fast(0, 0))
        plgpu.barrier_wait(q_bar)

        def body(j, carry):
            acc, m, l = carry
            stage = lax.rem(j, 2)
            pl.when(j + 1 < num_kb)(lambda: issue_fast(j + 1, 1 - stage))
            fast = contig_ref[row, kb0 + j] == 1
            pl.when(fast)(lambda: plgpu.barrier_wait(fast_bars.at[stage]))
            pl.when(jnp.logical_not(fast))(lambda: gather_slow(j, stage))

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, _transposed(k_tiles.at[stage]))
                return acc_ref[...]

            scores = pl.run_scoped(qk, plgpu.ACC((ROWS, BLOCK_K), jnp.float32)) * (scale * _LOG2E)
            # Row r holds token r // group at position p0 + r // group; it sees key c iff c <= that position,
            # i.e. r >= (c - p0) * group.
            r_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, BLOCK_K), 0, layout=plgpu.Layout.WGMMA)
            c_ids = plgpu.broadcasted_iota(jnp.int32, (ROWS, BLOCK_K), 1, layout=plgpu.Layout.WGMMA)
            visible = r_ids >= (c_ids + ((kb0 + j) * BLOCK_K - p0)) * group
            scores = jnp.where(visible, scores, _MASKED)
            m_new = jnp.maximum(m, scores.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(scores - lax.broadcast_in_dim(m_new, scores.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(dtype)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_tiles.at[stage])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            return acc, m_new, l

        acc0 = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m0 = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l0 = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc, m, l = lax.fori_loop(0, num_kb, body, (acc0, m0, l0))
        safe_l = jnp.where(l > 0, l, 1.0)
        out = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
        if not split:
            (o_ref,) = outs
            q_smem[...] = out.astype(dtype)  # q is no longer needed: reuse its tile for the output
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, h])
        else:
            o_ref, lse_ref = outs
            o_smem[...] = out
            lse_smem[...] = jnp.where(l > 0, m + jnp.log2(safe_l), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[s, b, h])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[s, b, h])
        plgpu.wait_smem_to_gmem(0)

    tiles = _transforms(dtype)
    pl.run_scoped(
        scoped,
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=tiles),
        plgpu.SMEM((2, BLOCK_K, head_dim), dtype, transforms=tiles),
        plgpu.SMEM((2, BLOCK_K, head_dim), dtype, transforms=tiles),
        plgpu.SMEM((BLOCK_K, head_dim), dtype),
        plgpu.SMEM((BLOCK_K, head_dim), dtype),
        plgpu.SMEM((BLOCK_K,), jnp.int32),
        plgpu.SMEM((ROWS, head_dim), jnp.float32) if split else None,
        plgpu.SMEM((ROWS,), jnp.float32) if split else None,
        (
            plgpu.Barrier(),
            plgpu.Barrier(num_arrivals=2, num_barriers=2),
            plgpu.Barrier(num_arrivals=2 * BLOCK_K),
            plgpu.Barrier(),
        ),
    )


def _pack_queries(q, blocks: plan.QueryBlocks, group: int):
    """q [n, heads, head_dim] → [blocks, kv_heads, 64, head_dim]; row r of a block is token r // group,
    head r % group of the KV head's group (zeros past the block's tokens). Also returns each row's token
    index (n for rows that own no token)."""
    n, heads, head_dim = q.shape
    kv_heads = heads // group
    r = jnp.arange(ROWS, dtype=jnp.int32)
    block_q = ROWS // group
    i, g = r // group, r % group
    valid = (i[None, :] < blocks.count[:, None]) & (i < block_q)[None, :]  # [blocks, 64]
    token = jnp.where(valid, blocks.start[:, None] + i[None, :], n)  # [blocks, 64]
    qg = jnp.concatenate([q, jnp.zeros((1, heads, head_dim), q.dtype)]).reshape(n + 1, kv_heads, group, head_dim)
    packed = qg[token[:, :, None], jnp.arange(kv_heads)[None, None, :], g[None, :, None]]  # [blocks, 64, kv, d]
    return packed.transpose(0, 2, 1, 3), token


def _unpack(rows_out, token, n: int, group: int):
    """Inverse of `_pack_queries`: [..., blocks, kv_heads, 64, x] → [..., n, heads, x]."""
    *lead, _, kv_heads, _, x = rows_out.shape
    g = jnp.arange(ROWS, dtype=jnp.int32) % group
    vals = jnp.swapaxes(rows_out, -3, -2)  # [..., blocks, 64, kv_heads, x]
    out = jnp.zeros((*lead, n + 1, kv_heads, group, x), rows_out.dtype)
    out = out.at[..., token[:, :, None], jnp.arange(kv_heads)[None, None, :], g[None, :, None], :].set(vals)
    return out[..., :n, :, :, :].reshape(*lead, n, kv_heads * group, x)


def cache_rows(num_slots: int) -> int:
    """Rows to allocate for `num_slots` slots + the scratch slot: a multiple of 8, as the kernel's TMA tiling needs."""
    return -(-(num_slots + 1) // 8) * 8


def paged_attention(
    q,  # [n, heads, head_dim]
    k_cache,  # [slots + 1, kv_heads, head_dim] bf16/fp16
    v_cache,
    positions,  # [n] int32
    slot_table,  # [rows, width] int32
    blocks: plan.QueryBlocks,  # built with block_q = 64 // group
    *,
    scale: float,
    splits: int = 1,
    interpret=None,
):
    """Causal attention of packed query tokens over their rows' cached keys; see attention_triton."""
    n, heads, head_dim = q.shape
    num_slots, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if group > ROWS or heads % kv_heads:
        raise ValueError(f"{heads} query heads over {kv_heads} KV heads do not fit {ROWS} rows")
    if k_cache.dtype not in (jnp.bfloat16, jnp.float16) or head_dim % 64:
        raise ValueError("the Mosaic GPU kernel takes bf16/fp16 caches with head_dim a multiple of 64")
    if num_slots % 8:
        raise ValueError(f"the Mosaic GPU kernel needs cache rows in multiples of 8 (TMA tiles), got {num_slots}")
    table = plan.pad_table(slot_table, BLOCK_K, num_slots - 1)
    rows, width = table.shape
    split_len = plan.split_length(width, splits, BLOCK_K)
    by_block = table.reshape(rows, width // BLOCK_K, BLOCK_K)
    first = by_block[:, :, 0]
    contig = jnp.all(by_block == first[:, :, None] + jnp.arange(BLOCK_K, dtype=jnp.int32), axis=2)
    # The TMA tiles rows by 8: a block's first slot must be a multiple of 8 (and the block inside the cache).
    contig = (contig & (first % 8 == 0) & (first + BLOCK_K <= num_slots)).astype(jnp.int32)
    q_packed, token = _pack_queries(q.astype(k_cache.dtype), blocks, group)
    num_blocks = q_packed.shape[0]
    p0 = jnp.where(blocks.count > 0, positions[jnp.minimum(blocks.start, n - 1)], 0)
    blk = jnp.stack([blocks.row, p0, blocks.count], axis=1).astype(jnp.int32)  # [blocks, 3]
    rows_shape = (num_blocks, kv_heads, ROWS, head_dim)
    if splits > 1:
        out_type = (
            jax.ShapeDtypeStruct((splits, *rows_shape), jnp.float32),
            jax.ShapeDtypeStruct((splits, num_blocks, kv_heads, ROWS), jnp.float32),
        )
    else:
        out_type = (jax.ShapeDtypeStruct(rows_shape, k_cache.dtype),)
    kernel = functools.partial(_kernel, group=group, split_len=split_len, scale=scale, split=splits > 1)
    outs = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(num_blocks, kv_heads, splits),
        grid_names=("blk", "kvh", "split"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )(blk, first, contig, table, q_packed, k_cache, v_cache)
    if splits == 1:
        return _unpack(outs[0], token, n, group).astype(q.dtype)
    o_part = _unpack(outs[0], token, n, group)  # [splits, n, heads, head_dim]
    lse = _unpack(outs[1][..., None], token, n, group)[..., 0]  # [splits, n, heads]
    return splitk.combine(o_part, lse).astype(q.dtype)
