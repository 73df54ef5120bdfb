"""Prefill over an int8 KV cache without reading int8: the step's own keys and values, rounded as the cache
stores them, through the 16-bit kernel.

A prefill chunk's own keys and values are in the step's arrays when the write quantises them into the cache.
Rounded the same way (int8 × per-token scale, dequantised in q's dtype), they are the values the cache holds, so
the chunk's own tokens can go through the paged kernel at its 16-bit launch with those arrays as a small cache:
row r's slot table is its packed tokens query_start[r], query_start[r] + 1, ..., and positions count from the
chunk's first token. Without a cached prefix (most prefills) that is all: no int8 is read and no dequantisation
runs in the kernel's loop, so the step runs at the 16-bit prefill's speed (the int8 kernel's was 0.75 of it on
the H200). A row with a prefix (a prompt-cache hit, a splitfuse chunk after the first) first attends to the
prefix through the int8 kernel, limited to the keys before its chunk (`key_limit`), and the own-token pass
resumes that softmax (`initial`): the two merge exactly, with no merge pass. Without any prefix the int8 pass
finds no key and writes nothing, so its cost is one launch; the choice is made per row on the device, with no
conditional in the step (XLA's GPU conditionals wait on the host for their predicate). Windows, soft-caps and
ALiBi see the same key-minus-query distances in both parts, so every layer kind takes this path.

The result is attention over the cache's values (as reference.paged_attention_int8 defines it), up to the 16-bit
rounding of the chunk's own dequantised keys, whatever the chunking. LightLLM's int8 prefill attends to the
unquantised keys instead, so its results move by the int8 error with splitfuse and prompt-cache hits.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.pallas import attention_triton, plan, reference


def prefill_attention(q, k_new, v_new, k_cache, v_cache, k_scale, v_scale, positions, token_req, query_start,
                      query_lens, slot_table, *, scale: float, own_launch: attention_triton.Launch,
                      prefix_launch: attention_triton.Launch, dequant: str, window: int | None = None,
                      softcap: float | None = None, alibi_slopes=None, interpret: bool = False):
    """Causal attention of a prefill step's packed tokens over the int8 cache they were just written to: each
    row's own new tokens from `k_new`/`v_new` ([n, kv_heads, head_dim], as computed this step; rounded here as
    reference.write_kv_int8 stores them), the keys before them from the cache (layout and scales as
    `attention_triton.paged_attention` takes them, read with `dequant`). Metadata as in a step
    (jaxllm/models/attention.py's AttentionMetadata). Returns [n, heads, head_dim] in q's dtype."""
    options = dict(scale=scale, interpret=interpret, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    prefix = prefix_pass(q, k_cache, v_cache, k_scale, v_scale, positions, query_start, query_lens, slot_table,
                         launch=prefix_launch, dequant=dequant, **options)
    return own_pass(q, k_new, v_new, positions, token_req, query_start, query_lens, prefix, launch=own_launch,
                    **options)


def prefix_lengths(positions, query_start, query_lens):
    """Each row's cached prefix: the position of its first new token (0 for rows without tokens)."""
    first = positions[jnp.clip(query_start, 0, positions.shape[0] - 1)]
    return jnp.where(query_lens > 0, first, 0).astype(jnp.int32)


def _blocks(launch, group, query_start, query_lens, n):
    block_q = max(1, launch.rows // group)
    return block_q, plan.ragged_blocks(query_start, query_lens, n, block_q)


def prefix_pass(q, k_cache, v_cache, k_scale, v_scale, positions, query_start, query_lens, slot_table, *,
                launch: attention_triton.Launch, dequant: str, **options):
    """The int8 part: each row's tokens over its cached prefix only. Returns (float32 output, base-2
    log-sum-exp, rows with a prefix); rows without one write nothing, and nothing reads them (so the outputs
    need no clearing)."""
    prefix_lens = prefix_lengths(positions, query_start, query_lens)
    block_q, blocks = _blocks(launch, q.shape[1] // k_cache.shape[1], query_start, query_lens, q.shape[0])
    o, lse = attention_triton.paged_attention(
        q, k_cache, v_cache, positions, slot_table, blocks, block_q=block_q, k_scale=k_scale, v_scale=v_scale,
        block_k=launch.block_k, num_warps=launch.num_warps, num_stages=launch.num_stages, return_lse=True,
        owns_all_tokens=True, dequant=dequant, key_limit=prefix_lens, diagonal_mask=launch.diagonal_mask, **options)
    return o, lse, prefix_lens > 0


def own_pass(q, k_new, v_new, positions, token_req, query_start, query_lens, prefix, *,
             launch: attention_triton.Launch, **options):
    """The 16-bit part: each row's tokens over its own new keys, rounded as the cache stores them, resuming
    `prefix_pass`'s softmax where a row has a prefix (`prefix` None: no row has one). Row r's table is its packed
    tokens; positions count from its chunk's first."""
    n = q.shape[0]
    k_new, v_new = (reference.dequantize_kv(*reference.quantize_kv(x)).astype(q.dtype) for x in (k_new, v_new))
    own_positions = positions - prefix_lengths(positions, query_start, query_lens)[token_req]
    own_table = jnp.minimum(query_start[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :], n - 1)
    block_q, blocks = _blocks(launch, q.shape[1] // k_new.shape[1], query_start, query_lens, n)
    return attention_triton.paged_attention(
        q, k_new, v_new, own_positions, own_table, blocks, block_q=block_q, block_k=launch.block_k,
        num_warps=launch.num_warps, num_stages=launch.num_stages, initial=prefix,
        diagonal_mask=launch.diagonal_mask, **options)
