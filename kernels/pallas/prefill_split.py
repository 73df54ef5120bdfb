"""Prefill as two attentions merged by their log-sum-exp: a chunk's own tokens through a dense causal kernel,
the cached prefix before them through the paged kernel.

Why: a prefill chunk's queries are consecutive, and its own keys and values are consecutive in the step's
arrays before they are written to the cache; only the prefix needs the slot table's gather. A dense kernel
(JAX's `attention_mgpu`: TMA loads, WGMMA, warp-specialised) can take the own-token part at its rate, and
the paged kernel keeps the part that needs the gather; or the prefix's keys are gathered by XLA into a dense
array first (one extra pass over them) and the dense kernel takes that part too. The two softmaxes merge
exactly by their base-2 log-sum-exps (`splitk.combine`).

Limits (why this is a benchmark option, `python -m kernels.pallas.bench --dense`, not the engine's path):
every row of a call brings the same number of new tokens (`attention_mgpu` takes [B, T, ...] with T a
multiple of 128; a ragged batch would need padding or a varlen dense kernel), a gathered prefix is as long
in every row (attention_mgpu has no key-length mask), plain layers only (no window, soft-cap or ALiBi),
bf16/fp16 values that fit fp16 (attention_mgpu's tiles are fp16).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels.pallas import attention_triton, plan, splitk


def dense_reference(q, k, v, scale: float, causal: bool = True):
    """Plain-JAX dense attention: q [B, T, N, H], k/v [B, S, K, H] (causal: S == T, top-left diagonal) →
    (float32 output [B, T, N, H], base-2 log-sum-exp of the scaled scores [B, T, N])."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
    if causal:
        scores = jnp.where(jnp.arange(k.shape[1])[None, :] <= jnp.arange(length)[:, None], scores, -jnp.inf)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G, T]
    out = jnp.einsum("bkgts,bskd->btkgd", jnp.exp(scores - lse[..., None]), v.astype(jnp.float32))
    lse2 = (lse / math.log(2)).transpose(0, 3, 1, 2).reshape(batch, length, heads)
    return out.reshape(batch, length, heads, head_dim), lse2


def dense_mgpu(q, k, v, scale: float, causal: bool = True, *, block_q: int = 64, block_kv: int = 128,
               steps: int = 2):
    """`dense_reference`'s contract through JAX's Mosaic GPU flash attention (Hopper; no interpret mode; key
    length a multiple of `block_kv`, query length of 2 · `block_q`). It has no softmax scale (q goes in
    pre-scaled) and fp16 tiles; its residual is the base-2 log-sum-exp [B, N, T]."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=block_q, block_kv=block_kv, max_concurrent_steps=steps,
                                         causal=causal)
    out, (lse,) = attention_mgpu.attention(*mgpu_operands(q, k, v, scale), config=config, save_residuals=True)
    return out.astype(jnp.float32), lse.transpose(0, 2, 1)


def mgpu_operands(q, k, v, scale: float):
    """attention_mgpu's inputs: fp16 (its shared-memory tiles are; bf16 fails to lower), q pre-scaled (it
    applies no softmax scale)."""
    return (q.astype(jnp.float32) * scale).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16)


def split_prefill(q, k_new, v_new, k_cache, v_cache, prefix_lens, slot_table, *, scale: float, dense=dense_reference,
                  gathered_prefix: int | None = None, launch: attention_triton.Launch = attention_triton.PREFILL,
                  interpret: bool = False):
    """Causal attention of each row's chunk of new tokens over its prefix and itself.

    q [B, T, heads, head_dim], k_new/v_new [B, T, kv_heads, head_dim]: row b's T new tokens (positions
    prefix_lens[b]..+T); k_cache/v_cache and slot_table as attention_triton's, row b's prefix at table
    columns 0..prefix_lens[b] (the chunk's own slots are not read: written or not, it does not matter).
    `dense(q, k, v, scale, causal)` → (float32 output, base-2 log-sum-exp [B, T, heads]): `dense_reference`
    or `dense_mgpu`; it takes the own tokens (causal). The prefix goes through our paged kernel, or with
    `gathered_prefix` = P (every row's prefix exactly P keys; `prefix_lens` is then not read) through an XLA
    gather of those keys into [B, P, ...] and `dense` (not causal). Returns [B, T, heads, head_dim] in q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    n = batch * length
    o_own, lse_own = dense(q, k_new, v_new, scale, True)
    if gathered_prefix == 0:
        return o_own.astype(q.dtype)
    if gathered_prefix is not None:
        slots = slot_table[:, :gathered_prefix]  # [B, P]
        o_prefix, lse_prefix = dense(q, k_cache[slots], v_cache[slots], scale, False)
    else:
        o_prefix, lse_prefix = _paged_prefix(q, k_cache, v_cache, prefix_lens, slot_table, scale, launch, interpret)
    parts = jnp.stack([o_prefix.reshape(n, heads, head_dim), o_own.reshape(n, heads, head_dim)])
    lses = jnp.stack([lse_prefix.reshape(n, heads), lse_own.reshape(n, heads)])
    return splitk.combine(parts, lses).reshape(q.shape).astype(q.dtype)


def _paged_prefix(q, k_cache, v_cache, prefix_lens, slot_table, scale, launch, interpret):
    """Each token over its row's prefix only, through the paged Triton kernel: (float32 output, base-2
    log-sum-exp), packed [B·T, ...]."""
    batch, length, heads, head_dim = q.shape
    n, group = batch * length, heads // k_cache.shape[1]
    block_q = max(1, launch.rows // group)
    starts = jnp.arange(batch, dtype=jnp.int32) * length
    blocks = plan.ragged_blocks(starts, jnp.full((batch,), length, jnp.int32), n, block_q)
    # Every token of row b sees the whole prefix and nothing after it: position prefix_lens[b] - 1
    # (-1 without a prefix: no key, log-sum-exp -inf, weight 0 in the merge).
    positions = jnp.repeat(prefix_lens.astype(jnp.int32) - 1, length)
    return attention_triton.paged_attention(
        q.reshape(n, heads, head_dim), k_cache, v_cache, positions, slot_table, blocks, scale=scale,
        block_q=block_q, block_k=launch.block_k, num_warps=launch.num_warps, num_stages=launch.num_stages,
        interpret=interpret, return_lse=True,
    )


def jitted(dense=dense_reference, gathered_prefix: int | None = None,
           launch: attention_triton.Launch = attention_triton.PREFILL, interpret: bool = False):
    """`split_prefill` jitted with its static choices bound (`scale` stays a keyword)."""
    return jax.jit(functools.partial(split_prefill, dense=dense, gathered_prefix=gathered_prefix, launch=launch,
                                     interpret=interpret), static_argnames="scale")
