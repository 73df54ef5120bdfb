"""Prefill over an int8 KV cache without reading int8 for a chunk's own tokens: the step's own keys and values,
rounded as the cache stores them, through 16-bit dots.

A prefill chunk's own keys and values are in the step's arrays when the write quantises them into the cache.
Rounded the same way (int8 × per-token scale, dequantised in q's dtype), they are the values the cache holds, so
each program of the paged kernel (`attention_triton.paged_attention(fresh_kv=...)`) first runs its tokens over
their row's own keys from those arrays with the 16-bit dots (no int8 read, no dequantisation in the loop), then
over the row's cached prefix from the int8 cache (`key_limit`: the columns before the chunk), continuing the same
softmax. Without a cached prefix (most prefills) the second loop runs no block, so the step runs at the 16-bit
prefill's speed (the int8 kernel's was 0.75 of it on the H200). One launch, no merge pass, and the choice is made
per program on the device, with no conditional in the step (XLA's GPU conditionals wait on the host for their
predicate). Windows, soft-caps and ALiBi see the same key-minus-query distances in both loops, so every layer kind
takes this path. (Two launches, the prefix's output merged into the own pass's, measured slower on the H200: the
merge's loads cost the own pass 30 %, and the prefix launch 50–80 µs with no key to read; docs/perf.md, session
22.)

The result is attention over the cache's values (as reference.paged_attention_int8 defines it), up to the 16-bit
rounding of the chunk's own dequantised keys, whatever the chunking. LightLLM's int8 prefill attends to the
unquantised keys instead, so its results move by the int8 error with splitfuse and prompt-cache hits.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels.pallas import attention_triton, plan, reference


def prefill_attention(q, k_new, v_new, k_cache, v_cache, k_scale, v_scale, positions, query_start, query_lens,
                      slot_table, *, scale: float, launch: attention_triton.Launch, dequant: str,
                      window: int | None = None, softcap: float | None = None, alibi_slopes=None,
                      interpret: bool = False):
    """Causal attention of a prefill step's packed tokens over the int8 cache they were just written to: each
    row's own new tokens from `k_new`/`v_new` ([n, kv_heads, head_dim], as computed this step; rounded here as
    reference.write_kv_int8 stores them), the keys before them from the cache (layout and scales as
    `attention_triton.paged_attention` takes them, read with `dequant`). Metadata as in a step
    (jaxllm/models/attention.py's AttentionMetadata); `launch` serves both loops. Returns [n, heads, head_dim] in
    q's dtype."""
    n, heads, _ = q.shape
    k_new, v_new = (reference.dequantize_kv(*reference.quantize_kv(x)).astype(q.dtype) for x in (k_new, v_new))
    block_q = max(1, launch.rows // (heads // k_new.shape[1]))
    blocks = plan.ragged_blocks(query_start, query_lens, n, block_q)
    return attention_triton.paged_attention(
        q, k_cache, v_cache, positions, slot_table, blocks, scale=scale, block_q=block_q, k_scale=k_scale,
        v_scale=v_scale, block_k=launch.block_k, num_warps=launch.num_warps, num_stages=launch.num_stages,
        dequant=dequant, key_limit=prefix_lengths(positions, query_start, query_lens), fresh_kv=(k_new, v_new),
        diagonal_mask=launch.diagonal_mask, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
        interpret=interpret)


def prefix_lengths(positions, query_start, query_lens):
    """Each row's cached prefix: the position of its first new token (0 for rows without tokens)."""
    first = positions[jnp.clip(query_start, 0, positions.shape[0] - 1)]
    return jnp.where(query_lens > 0, first, 0).astype(jnp.int32)
