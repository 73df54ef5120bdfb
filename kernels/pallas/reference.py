"""Plain-JAX references for the attention kernels: the definition every kernel is tested against.

KV layout (one pair of buffers per layer): `k_cache`, `v_cache` are `[num_slots + 1, kv_heads, head_dim]`;
the last slot is a scratch slot that padded tokens write to and padded table entries point at.
A request's keys live at `slot_table[r, 0..length)`, position p at column p.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Query tokens per gathered block in `paged_attention`: bounds the gathered keys to
# block × table_width × kv_heads × head_dim elements.
_QUERY_BLOCK = 64


def write_kv(k_cache, v_cache, k, v, slots):
    """Scatter new keys/values `[n, kv_heads, head_dim]` into their slots `[n]`."""
    return k_cache.at[slots].set(k.astype(k_cache.dtype)), v_cache.at[slots].set(v.astype(v_cache.dtype))


def _attend_one_token(q, keys, values, position, scale):
    # q [kv, g, d]; keys/values [t, kv, d]; position: scalar
    scores = jnp.einsum("kgd,tkd->kgt", q.astype(jnp.float32), keys.astype(jnp.float32)) * scale
    visible = jnp.arange(keys.shape[0]) <= position  # [t]
    scores = jnp.where(visible[None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("kgt,tkd->kgd", probs, values.astype(jnp.float32))


def paged_attention(q, k_cache, v_cache, token_req, positions, slot_table, scale):
    """Causal attention of packed query tokens over their requests' cached keys.

    q [n, heads, head_dim]; token_req [n] (row of slot_table); positions [n] (the token's own
    position: it sees keys at positions 0..positions[i], its own included, already written);
    slot_table [rows, width]. Returns [n, heads, head_dim] in q's dtype.
    """
    n, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    grouped = q.reshape(n, kv_heads, heads // kv_heads, head_dim)

    def one_token(args):
        q_tok, req, pos = args
        slots = slot_table[req]  # [width]
        return _attend_one_token(q_tok, k_cache[slots], v_cache[slots], pos, scale)

    # lax.map vmaps `one_token` over blocks of _QUERY_BLOCK tokens: bounded gathered-key memory.
    out = jax.lax.map(one_token, (grouped, token_req, positions), batch_size=_QUERY_BLOCK)
    return out.reshape(n, heads, head_dim).astype(q.dtype)


def decode_attention(q, k_cache, v_cache, slot_table, lengths, scale):
    """One query token per request: q [b, heads, head_dim], lengths [b] (keys incl. the new one)."""
    b = q.shape[0]
    return paged_attention(q, k_cache, v_cache, jnp.arange(b), lengths - 1, slot_table, scale)
