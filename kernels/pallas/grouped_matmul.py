"""Grouped matmul of rows sorted by group (the (token, expert) pairs of a MoE layer) as a Pallas kernel lowered
through Triton: `out[r] = x[r] @ w[group of r]`, the reference being `jax.lax.ragged_dot`.

A program owns (tile, output column block). A tile is up to `block_m` consecutive rows of one group, so each
group's weights are read once per tile and groups without rows cost nothing: at one token, the kernel reads
only the experts it is routed to. The tiles are planned on the device from the group sizes (`tile_plan`, no
host sync); there are at most cdiv(rows, block_m) + groups of them, the unused ones skip their loop.
With a `scale`, the weights are int8 stored output-major ([groups, N, K], as `jaxllm.models.quant.Int8Weight`
keeps them) with a float32 scale per output channel: each block is converted to the activations' dtype in
registers and the scale applied to the accumulator (exact: it is constant along the contraction), so no
dequantised weight exists in memory (w8a16 experts).
Like `attention_triton.py`, it runs in Pallas interpret mode on the CPU, which is how CI tests it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import plan


def tile_plan(group_sizes, rows: int, block_m: int):
    """Per tile: its group, first row and row count (0 for an unused tile), int32 [tiles] each."""
    groups = group_sizes.shape[0]
    num_tiles = -(-rows // block_m) + groups
    sizes = group_sizes.astype(jnp.int32)
    tiles_of = (sizes + block_m - 1) // block_m  # [groups]
    tile_end = jnp.cumsum(tiles_of)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.searchsorted(tile_end, t, side="right").astype(jnp.int32)  # == groups past the last tile
    g = jnp.minimum(group, groups - 1)
    local = t - (tile_end - tiles_of)[g]  # the tile's index within its group
    start = (jnp.cumsum(sizes) - sizes)[g] + local * block_m
    count = jnp.where(group < groups, jnp.clip(sizes[g] - local * block_m, 0, block_m), 0)
    return g, start, count.astype(jnp.int32)


def _kernel(group_ref, start_ref, count_ref, x_ref, w_ref, *rest, block_m: int, block_n: int, block_k: int,
            scaled: bool):
    scale_ref, o_ref = rest if scaled else (None, *rest)
    t, j = pl.program_id(0), pl.program_id(1)
    g, start, count = group_ref[t], start_ref[t], count_ref[t]
    r = jnp.arange(block_m, dtype=jnp.int32)
    valid = r < count
    row = start + jnp.minimum(r, jnp.maximum(count - 1, 0))  # clamped: invalid lanes reuse a real row
    k_dim = x_ref.shape[1]
    f32 = x_ref.dtype == jnp.float32

    def body(kb, acc):
        cols = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
        xa = pltriton.load(x_ref.at[row[:, None], cols[None, :]])  # [block_m, block_k] gathered rows
        if scaled:  # int8 [block_n, block_k] of the output-major weights, converted in registers
            wb = w_ref[g, pl.ds(j * block_n, block_n), pl.ds(kb * block_k, block_k)].astype(xa.dtype)
            return acc + pltriton.dot(xa, wb, trans_b=True, allow_tf32=False if f32 else None)
        wb = w_ref[g, pl.ds(kb * block_k, block_k), pl.ds(j * block_n, block_n)]  # [block_k, block_n]
        return acc + pltriton.dot(xa, wb, allow_tf32=False if f32 else None)

    # Tiles without rows do nothing. The loop's bounds are static: Triton's `scf.for` takes no traced bound
    # beside a constant one (they differ in type).
    @pl.when(count > 0)
    def _():
        acc = lax.fori_loop(0, k_dim // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        if scaled:
            acc = acc * scale_ref[g, pl.ds(j * block_n, block_n)][None, :]
        # Invalid lanes store (masked) past the end: interpret mode rewrites masked lanes, and a duplicate of a
        # valid row's index would undo that row's write; on the GPU masked lanes touch nothing.
        dst = jnp.where(valid, row, o_ref.shape[0] + r)
        out_cols = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
        pltriton.store(o_ref.at[dst[:, None], out_cols[None, :]], acc.astype(o_ref.dtype), mask=valid[:, None])


def supports(rows: int, k: int, n: int, weight_elements: int) -> bool:
    """Whether `grouped_matmul` takes these sizes (blocks of 16 or more dividing K and N, int32 offsets)."""
    return (plan.pow2_divisor(k, 64, 16) is not None and plan.pow2_divisor(n, 128, 16) is not None
            and weight_elements < 2**31 and rows * k < 2**31)


def fitted_block(dim: int, wanted: int) -> int:
    """The largest power-of-two block from `wanted` down to 16 that divides `dim`; ValueError if none does."""
    block = plan.pow2_divisor(dim, wanted, 16)
    if block is None:
        raise ValueError(f"grouped_matmul: no block of 16 or more divides {dim}")
    return block


def grouped_matmul(x, w, group_sizes, *, scale=None, block_m: int | None = None, block_n: int = 128,
                   block_k: int = 64, num_warps: int = 4, num_stages: int = 3, interpret: bool = False):
    """x [m, K] with group g's rows contiguous and in group order, w [groups, K, N], group_sizes [groups]
    (summing to m) → [m, N] in x's dtype. With `scale` [groups, N] (float32): w is int8 [groups, N, K] and
    out[r] = (x[r] @ w[g]ᵀ) * scale[g]. `block_n` / `block_k` shrink to the largest power of two that
    divides N / K (at least 16, Triton's dot); `block_m` defaults to 16 rows for up to 256 rows (decode:
    few rows per expert), 64 beyond."""
    m, k_dim = x.shape
    scaled = scale is not None
    groups, n = (w.shape[0], w.shape[1]) if scaled else (w.shape[0], w.shape[2])
    block_m = block_m or (16 if m <= 256 else 64)
    block_n, block_k = fitted_block(n, block_n), fitted_block(k_dim, block_k)
    if block_m < 16:
        raise ValueError(f"grouped_matmul: block_m={block_m} is below 16")
    if w.size >= 2**31 or x.size >= 2**31:
        raise ValueError("grouped_matmul: an operand of 2**31 elements or more overflows the kernel's int32 offsets")
    group, start, count = tile_plan(group_sizes, m, block_m)
    kernel = functools.partial(_kernel, block_m=block_m, block_n=block_n, block_k=block_k, scaled=scaled)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(group.shape[0], n // block_n),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(group, start, count, x, w, *((scale.astype(jnp.float32),) if scaled else ()))
