"""Plain-JAX references for the attention kernels: the definition every kernel is tested against.

KV layout (one pair of buffers per layer): `k_cache`, `v_cache` are `[num_slots + 1, kv_heads, head_dim]`;
the last slot is a scratch slot that padded tokens write to and padded table entries point at.
A request's keys live at `slot_table[r, 0..length)`, position p at column p.
int8 caches add one float32 scale per token per head, `[num_slots + 1, kv_heads]` (symmetric, round to nearest).
Per-layer options of every function: `window` (a token sees keys at positions > its own - window),
`softcap` (scores become `cap * tanh(scores / cap)`), `alibi_slopes` [heads] (scores gain
`slope * (key position - query position)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Query tokens per gathered block in `paged_attention`: bounds the gathered keys to
# block × table_width × kv_heads × head_dim elements.
_QUERY_BLOCK = 64
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def write_kv(k_cache, v_cache, k, v, slots):
    """Scatter new keys/values `[n, kv_heads, head_dim]` into their slots `[n]`."""
    return k_cache.at[slots].set(k.astype(k_cache.dtype)), v_cache.at[slots].set(v.astype(v_cache.dtype))


def quantize_kv(x):
    """Symmetric int8 per token per head: x [n, kv_heads, head_dim] → (int8 [n, kv_heads, head_dim],
    float32 scale [n, kv_heads]) with x ≈ int8 * scale. An all-zero vector gets scale 0."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0  # [n, kv_heads]
    safe = jnp.where(scale > 0, scale, 1.0)
    x_i8 = jnp.clip(jnp.round(x32 / safe[..., None]), -127, 127).astype(jnp.int8)
    return x_i8, scale


def dequantize_kv(x_i8, scale):
    """Inverse of `quantize_kv`: int8 [..., head_dim] × scale [...] → float32."""
    return x_i8.astype(jnp.float32) * scale[..., None]


def write_kv_int8(k_cache, v_cache, k_scale, v_scale, k, v, slots, pack=None):
    """Quantise new keys/values `[n, kv_heads, head_dim]` and scatter them (and their scales) into `slots`.
    `pack`: the int8 rows' storage form, if not int8 (int8_dequant.as_pairs for "pairs" caches)."""
    k_i8, ks = quantize_kv(k)
    v_i8, vs = quantize_kv(v)
    if pack is not None:
        k_i8, v_i8 = pack(k_i8), pack(v_i8)
    return (
        k_cache.at[slots].set(k_i8),
        v_cache.at[slots].set(v_i8),
        k_scale.at[slots].set(ks),
        v_scale.at[slots].set(vs),
    )


def _attend_one_token(q, keys, values, position, scale, window=None, softcap=None, slopes=None):
    # q [kv, g, d]; keys/values [t, kv, d]; position: scalar; slopes [kv, g] or None
    scores = jnp.einsum("kgd,tkd->kgt", q.astype(jnp.float32), keys.astype(jnp.float32)) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    key_pos = jnp.arange(keys.shape[0])
    if slopes is not None:
        scores = scores + slopes[:, :, None] * (key_pos - position).astype(jnp.float32)[None, None, :]
    visible = key_pos <= position  # [t]
    if window is not None:
        visible = visible & (key_pos > position - window)
    scores = jnp.where(visible[None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("kgt,tkd->kgd", probs, values.astype(jnp.float32))


def paged_attention(q, k_cache, v_cache, token_req, positions, slot_table, scale, **options):
    """Causal attention of packed query tokens over their requests' cached keys.

    q [n, heads, head_dim]; token_req [n] (row of slot_table); positions [n] (the token's own
    position: it sees keys at positions 0..positions[i], its own included, already written);
    slot_table [rows, width]. Returns [n, heads, head_dim] in q's dtype.
    """
    gather = lambda slots: (k_cache[slots], v_cache[slots])  # noqa: E731
    return _paged(q, gather, k_cache.shape[1], token_req, positions, slot_table, scale, **options)


def _paged(q, gather, kv_heads, token_req, positions, slot_table, scale, window=None, softcap=None,
           alibi_slopes=None):
    # gather(slots [width]) -> keys, values [width, kv_heads, head_dim]
    n, heads, head_dim = q.shape
    grouped = q.reshape(n, kv_heads, heads // kv_heads, head_dim)
    slopes = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32).reshape(kv_heads, heads // kv_heads)

    def one_token(args):
        q_tok, req, pos = args
        keys, values = gather(slot_table[req])
        return _attend_one_token(q_tok, keys, values, pos, scale, window, softcap, slopes)

    # lax.map vmaps `one_token` over blocks of _QUERY_BLOCK tokens: bounded gathered-key memory.
    out = jax.lax.map(one_token, (grouped, token_req, positions), batch_size=_QUERY_BLOCK)
    return out.reshape(n, heads, -1).astype(q.dtype)  # values may be narrower than keys (latent attention)


def paged_attention_int8(q, k_cache, v_cache, k_scale, v_scale, token_req, positions, slot_table, scale, **options):
    """`paged_attention` over an int8 cache: keys/values are dequantised with their per-token scales."""

    def gather(slots):
        return dequantize_kv(k_cache[slots], k_scale[slots]), dequantize_kv(v_cache[slots], v_scale[slots])

    return _paged(q, gather, k_cache.shape[1], token_req, positions, slot_table, scale, **options)


def latent_attention(q, cache, token_req, positions, slot_table, scale, kv_rank: int):
    """Multi-head latent attention in the latent space (DeepSeek-V2, key and value up-projections absorbed
    into the query and the output): one cache row per token, its latent then its rotary key,
    cache [num_slots + 1, 1, kv_rank + rope_dim]; q [n, heads, kv_rank + rope_dim] (the no-rope query times
    the key up-projection, then the rotary query). Scores are q · row, values the rows' latent part.
    Returns [n, heads, kv_rank] in q's dtype."""
    gather = lambda slots: (cache[slots], cache[slots][..., :kv_rank])  # noqa: E731
    return _paged(q, gather, 1, token_req, positions, slot_table, scale)


def decode_attention(q, k_cache, v_cache, slot_table, lengths, scale, **options):
    """One query token per request: q [b, heads, head_dim], lengths [b] (keys incl. the new one)."""
    b = q.shape[0]
    return paged_attention(q, k_cache, v_cache, jnp.arange(b), lengths - 1, slot_table, scale, **options)


def decode_attention_int8(q, k_cache, v_cache, k_scale, v_scale, slot_table, lengths, scale, **options):
    """`decode_attention` over an int8 cache."""
    b = q.shape[0]
    return paged_attention_int8(
        q, k_cache, v_cache, k_scale, v_scale, jnp.arange(b), lengths - 1, slot_table, scale, **options
    )


# --- quantised matmuls -----------------------------------------------------------------------------
# int8 weights are [n, k] (output-major: the inputs contiguous, as the integer tensor cores want both operands),
# one float32 scale per output. int4 weights are [k / 8, n]: unsigned 0..15 values, 8 consecutive inputs per
# int32 (input 8r + j in bits 4j..4j+3 of row r, GPTQ's order), with a scale and a zero point per group of
# `group` inputs: w = (q - zero) * scale.


def quantize_rows_fp8(x):
    """float8 e4m3 per row: x [m, k] → (e4m3 [m, k], float32 scale [m]) with x ≈ q * scale."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / FP8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    return (x32 / safe[:, None]).astype(jnp.float8_e4m3fn), scale


def quantize_rows_int8(x):
    """Symmetric int8 per row (per token): x [m, k] → (int8 [m, k], float32 scale [m]); an all-zero row
    gets scale 0."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x32 / safe[:, None]), -127, 127).astype(jnp.int8), scale


def unpack_int4(packed):
    """int32 [k / 8, *n] → int32 [k, *n] values 0..15 (input 8r + j from bits 4j of row r)."""
    shifts = (jnp.arange(8, dtype=jnp.int32) * 4).reshape((1, 8) + (1,) * (packed.ndim - 1))
    nibbles = (packed[:, None] >> shifts) & 0xF  # [k / 8, 8, *n]
    return nibbles.reshape(-1, *packed.shape[1:])


def dequantize_int4(packed, scale, zero):
    """int4 weights → float32 [k, *n]; scale, zero [k / group, *n]."""
    q = unpack_int4(packed).astype(jnp.float32)
    group = q.shape[0] // scale.shape[0]
    expand = lambda a: jnp.repeat(a.astype(jnp.float32), group, axis=0)  # noqa: E731
    return (q - expand(zero)) * expand(scale)


def dot_nk(x, w, out_dtype):
    """x [m, k] @ w[n, k]ᵀ → [m, n], accumulated in `out_dtype`."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)


def int8_matmul(x, w, scale):
    """w8a16: x [m, k] @ (int8 w [n, k] * scale [n])ᵀ → [m, n] in x's dtype (float32 accumulation)."""
    with jax.default_matmul_precision("highest"):
        out = dot_nk(x.astype(jnp.float32), w.astype(jnp.float32), jnp.float32)
    return (out * scale[None, :]).astype(x.dtype)


def int4_matmul(x, packed, scale, zero):
    """w4a16: x [m, k] @ dequantised int4 weights → [m, n] in x's dtype."""
    w = dequantize_int4(packed, scale, zero)
    return jnp.dot(x.astype(jnp.float32), w, precision="highest").astype(x.dtype)


def int8_int8_matmul(x_q, x_scale, w, w_scale, out_dtype):
    """w8a8: int8 x [m, k] (scale [m]) @ int8 w [n, k]ᵀ (scale [n]), int32 accumulation → [m, n]."""
    acc = dot_nk(x_q, w, jnp.int32)
    return (acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :]).astype(out_dtype)
