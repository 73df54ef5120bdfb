"""Paged attention over the token-level KV cache as a Pallas kernel lowered through Triton (`pallas.triton`).

One kernel serves decode (one query token per row), split-K decode and ragged causal prefill, for bf16/fp16
and int8 caches. A program owns (query block, KV head, key split): its query rows are the block's tokens ×
the KV head's group of query heads, so every key and value byte is read once per block (GQA).

Why Triton and not Mosaic GPU (the Hopper default otherwise): it measured faster on the H100 with JAX 0.11.2
in every case, e.g. decode at batch 64, context 4096: 367–374 µs (0.96–0.98 of 2.98 TB/s) against 404 µs for
`attention_mosaic.py`, and 391 µs against 1529 µs when the slots are scattered; prefill 238 against 165
TFLOP/s (docs/perf.md, "## Attention kernels"). Keys are gathered token by token through the slot table:
Triton emits those gathers as coalesced 16-byte loads per thread, while Hopper's TMA has no gather (that is
Blackwell-only), so the Mosaic kernel needs consecutive slots or one TMA per token. The Triton lowering is
deprecated since JAX 0.11.0 but builds and runs with 0.11.2. This kernel also runs in Pallas interpret mode on
the CPU (`interpret=True`), which is how CI tests it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.pallas import int8_dequant, plan

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Launch:
    """Block sizes and launch settings. `rows`: query rows per program in prefill (tokens × the KV head's
    group of query heads); decode always takes one token per program. `dequant`: how int8 caches become dot
    operands (int8_dequant.py's modes; float caches ignore it). `diagonal_mask`: prefill builds its causal mask only
    on the key blocks that reach the diagonal (those below it run a loop without it): on the H200, 1 × 4096 chained,
    490 µs against 535 with the mask on every block (docs/perf.md, session 22)."""

    block_k: int
    num_warps: int
    num_stages: int
    rows: int = 64
    dequant: str = "cast"
    diagonal_mask: bool = False

    def __post_init__(self):
        int8_dequant.check(self.dequant)


# Tuned on the H100 (JAX 0.11.2; docs/perf.md "## Attention kernels" has the sweeps).
DECODE = Launch(block_k=64, num_warps=4, num_stages=2)  # 0.96–0.98 of 2.98 TB/s at batch 64, context 4096
# Short contexts (a few loop steps a program): on the H200, batch 256 / 129 keys, 32/2/3 took 57.8 µs against
# DECODE's 73.7 (batch 512 / 192 keys: 114.5 against 116.4; docs/perf.md, session 26). Slot tables at most
# SHORT_DECODE_WIDTH keys wide (the engine's pow2 width buckets) decode with it where the programs fill the machine
# twice over, as there (a batch-1 step's 8 programs were not measured with it).
DECODE_SHORT = Launch(block_k=32, num_warps=2, num_stages=3)
SHORT_DECODE_WIDTH = 256
# int8 (int8_dequant.py; docs/perf.md "int8 KV decode: where the time goes" and session 10's H200 sweep): the old
# 32/4/5 "cast" decode runs 15.8 warp instructions per key in its loop (Triton 3.9's sm_90 SASS), "pairs" 8.3
# (bf16 decode: 5.0). On the H200, batch 64 / 4k: "pairs" at 128/4/2 153 µs against bf16's 256 µs (1.67×; "cast"
# 242 µs); batch 1 / 32k 42 µs against 48 µs. Prefill runs over the cache decode's "pairs" lays out (777 µs at
# 1 × 4096 against "cast"'s 736 and bf16's 580). The engine's int8 prefill runs this launch with a chunk's own
# keys in 16 bits (fresh_prefill.py): 507 µs at 1 × 4096 against bf16's 490 (chained; 32/4/3 took 591, 64/4/3 616).
DECODE_INT8 = Launch(block_k=128, num_warps=4, num_stages=2, dequant="pairs")
PREFILL = Launch(block_k=32, num_warps=4, num_stages=3, rows=64, diagonal_mask=True)
PREFILL_INT8 = Launch(block_k=64, num_warps=4, num_stages=2, rows=64, dequant="pairs", diagonal_mask=True)


def decode_launch(width: int, programs: int, long: Launch = DECODE) -> Launch:
    """The tuned decode launch for a slot table `width` keys wide, over `programs` = rows × KV heads: `long` (DECODE
    for a 16-bit cache; an int8 cache passes its own, whose `dequant` its layout follows), or at short widths
    DECODE_SHORT with `long`'s dequant. int8 "pairs" on the H200, keys scattered: batch 512 / 192 keys 95.7 µs
    against DECODE_INT8's 141.8 (bf16 short 116.7), batch 256 / 129 keys 47.6 against 78.4 (bf16 59.4; docs/perf.md,
    session 29); an int8 "cast" cache (head dims pairs do not fit) was not measured short."""
    if width <= SHORT_DECODE_WIDTH and programs >= 2 * plan.num_sms():
        return dataclasses.replace(DECODE_SHORT, dequant=long.dequant)
    return long


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _rows(ref, idx, width: int):
    """ref.at[idx, :] spelled with two broadcast index arrays: masked loads/stores need that in interpret mode."""
    return ref.at[idx[:, None], jnp.arange(width, dtype=jnp.int32)[None, :]]


def _kernel(
    blk_row_ref,  # [blocks] int32
    blk_start_ref,  # [blocks] int32
    blk_count_ref,  # [blocks] int32
    positions_ref,  # [n] int32
    table_ref,  # [rows, width] int32 (width a multiple of block_k)
    q_ref,  # [n * heads, head_dim]
    k_ref,  # [(slots + 1) * kv_heads, head_dim] (int8 "pairs": int16 [.., head_dim / 2])
    v_ref,  # [(slots + 1) * kv_heads, head_dim]
    ks_ref,  # [(slots + 1) * kv_heads] float32, or None (float cache)
    vs_ref,  # likewise
    slopes_ref,  # [heads] float32 ALiBi slopes, or None
    limit_ref,  # [rows] int32 keys per row (table columns at or past it unseen), or None
    own_k_ref,  # [n * kv_heads, head_dim] in q's dtype: the step's own keys (fresh_prefill.py), or None
    own_v_ref,  # likewise its values
    *out_refs,  # o [n * heads, head_dim]; split-K: o [splits * n * heads, head_dim] f32, lse [splits * n * heads]
    heads: int,
    kv_heads: int,
    rows_m: int,
    block_q: int,
    block_k: int,
    split_len: int,
    num_tokens: int,
    scale: float,
    split: bool,
    head_dim: int,
    window: int | None,
    softcap: float | None,
    dequant: str,
    diagonal_mask: bool,
    interpret: bool,
):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    group = heads // kv_heads
    row = blk_row_ref[b]
    start = blk_start_ref[b]
    count = blk_count_ref[b]

    r = jnp.arange(rows_m, dtype=jnp.int32)  # query row = (token i, head g of the group)
    i, g = r // group, r % group
    valid = (i < count) & (i < block_q)  # [M]
    token = start + jnp.minimum(i, jnp.maximum(count - 1, 0))  # clamped: invalid rows reuse a real token
    q_idx = token * heads + h * group + g  # [M] row of q_ref / o_ref
    # A head_dim that is not a power of two is padded to one in registers: its lanes past head_dim are masked.
    dim_p = q_ref.shape[1] if head_dim is None else _next_pow2(head_dim)
    dim_ok = jnp.arange(dim_p, dtype=jnp.int32)[None, :] < q_ref.shape[1]
    row_mask = valid[:, None] if head_dim is None else valid[:, None] & dim_ok  # [M, D] loads/stores of q, o
    # Head-dim columns of q and o, in the groups the dots take: all, or (int8 "pairs") even and odd ones.
    col_sets = [jnp.arange(dim_p, dtype=jnp.int32)]
    if dequant == "pairs":
        half = jnp.arange(dim_p // 2, dtype=jnp.int32)
        col_sets = [2 * half, 2 * half + 1]
    pos = positions_ref[token]  # [M]
    first_pos = positions_ref[start]
    last_pos = positions_ref[start + jnp.maximum(count - 1, 0)]  # keys 0..last_pos matter to this block

    lo = s * split_len
    if window is not None:  # keys before the first token's window matter to no token of the block
        lo = jnp.maximum(lo, jnp.maximum(first_pos - window + 1, 0) // block_k * block_k)
    hi = jnp.where(count > 0, jnp.minimum(s * split_len + split_len, last_pos + 1), lo)
    if limit_ref is not None:
        hi = jnp.minimum(hi, limit_ref[row])
    num_kb = jnp.maximum(hi - lo + block_k - 1, 0) // block_k
    has_keys = num_kb > 0
    if own_k_ref is not None:
        # The row's own new tokens, packed in the step from its first (`own_first`), at positions from `prefix`
        # on: own column j is key position prefix + j (the cache's columns stop at the prefix: `limit_ref`).
        prefix = limit_ref[row]
        own_first = start - (first_pos - prefix)
        own_lo = 0 if window is None else jnp.maximum(first_pos - window + 1 - prefix, 0) // block_k * block_k
        own_hi = jnp.where(count > 0, last_pos + 1 - prefix, own_lo)
        own_kb = jnp.maximum(own_hi - own_lo + block_k - 1, 0) // block_k
        has_keys = has_keys | (own_kb > 0)
    # A program with no key block (a split past its row's last key) loads no query.
    q_parts = [pltriton.load(q_ref.at[q_idx[:, None], c[None, :]], mask=row_mask & has_keys, other=0)
               for c in col_sets]
    q16_parts = q_parts  # q as given: the own keys' dots
    q = q_parts[0]  # [M, D] (or its even columns)
    plain = softcap is None and slopes_ref is None
    qk_scale = scale * _LOG2E if plain else scale  # scores in base 2 (after the cap / bias otherwise)
    slopes = None if slopes_ref is None else slopes_ref[h * group + g]  # [M]
    f32 = q.dtype == jnp.float32
    compute_dtype = q.dtype
    q_i8 = q_scale = None
    if ks_ref is not None:
        compute_dtype = int8_dequant.operand_dtype(dequant, q.dtype)
        if dequant == "qk8" and compute_dtype != jnp.float32:
            q_i8, q_scale = int8_dequant.quantize_rows(q)
        q_parts = [x.astype(compute_dtype) for x in q_parts]
        q = q_parts[0]
        to_operand = functools.partial(int8_dequant.convert, dtype=compute_dtype, mode=dequant,
                                       interpret=interpret)

    def gather(ref, kv_idx):
        if head_dim is None:
            return ref[kv_idx, :]  # [T, D] gathered rows
        return pltriton.load(_rows(ref, kv_idx, dim_p), mask=dim_ok, other=0)

    def gather_parts(ref, kv_idx, own: bool):
        """Rows of a 16-bit source split as the accumulators are: all columns, or (int8 "pairs") even and odd
        ones, which the own keys hold as two contiguous halves (`paged_attention` deinterleaves them: strided
        loads cost the H200's prefill 4x)."""
        if len(col_sets) == 1:
            return [gather(ref, kv_idx)]
        half = dim_p // 2
        columns = [jnp.arange(half, dtype=jnp.int32) + half * j for j in range(2)] if own else col_sets
        return [pltriton.load(ref.at[kv_idx[:, None], c[None, :]]) for c in columns]

    def body(kb, carry, masked: bool, lo, hi, key_offset, kv_index, own: bool):
        """One key block: columns lo + kb * block_k ...; key positions key_offset + column; `own`: the step's
        16-bit own keys (else the cache, int8 or not)."""
        *accs, m, l = carry
        col0 = lo + kb * block_k
        cols = col0 + jnp.arange(block_k, dtype=jnp.int32)  # [T] columns
        key_pos = cols if key_offset is None else key_offset + cols  # [T] key positions
        kv_idx = kv_index(col0)
        k_src, v_src = (own_k_ref, own_v_ref) if own else (k_ref, v_ref)
        if own or ks_ref is None:
            k_parts = gather_parts(k_src, kv_idx, own)
            qs = q16_parts if own else q_parts
            scores = sum(pltriton.dot(a, b, trans_b=True, allow_tf32=False if f32 else None)
                         for a, b in zip(qs, k_parts))  # [M, T] f32
        else:
            k = gather(k_src, kv_idx)
            if dequant == "pairs":
                k_parts = int8_dequant.split_pairs(k, compute_dtype, interpret)
                (q0, q1), (k0, k1) = q_parts, k_parts
                scores = pltriton.dot(q0, k0, trans_b=True) + pltriton.dot(q1, k1, trans_b=True)
                scores = scores * ks_ref[kv_idx][None, :]
            elif q_i8 is not None:  # int8 × int8 → int32, exact
                scores = pltriton.dot(q_i8, k, trans_b=True).astype(jnp.float32)
                scores = scores * (q_scale[:, None] * ks_ref[kv_idx][None, :])
            else:
                scores = pltriton.dot(q, to_operand(k), trans_b=True, allow_tf32=False if f32 else None)
                scores = scores * ks_ref[kv_idx][None, :]
        scores = scores * qk_scale
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        if slopes is not None:
            scores = scores + slopes[:, None] * (key_pos[None, :] - pos[:, None]).astype(jnp.float32)
        if not plain:
            scores = scores * _LOG2E
        if masked:
            visible = (key_pos[None, :] <= pos[:, None]) & (cols[None, :] < hi)
            if window is not None:
                visible = visible & (key_pos[None, :] > pos[:, None] - window)
            scores = jnp.where(visible, scores, -jnp.inf)
        m_new = jnp.maximum(m, scores.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing visible yet stay at 0
        p = jnp.exp2(scores - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        l = l * alpha + p.sum(axis=1)
        if own or vs_ref is None:
            v_parts = gather_parts(v_src, kv_idx, own)
            p = p.astype(q16_parts[0].dtype if own else compute_dtype)
        else:
            v = gather(v_src, kv_idx)
            p = p * vs_ref[kv_idx][None, :]
            v_parts = int8_dequant.split_pairs(v, compute_dtype, interpret) if dequant == "pairs" else [to_operand(v)]
            p = p.astype(compute_dtype)
        pvs = [pltriton.dot(p, x, allow_tf32=False if f32 else None) for x in v_parts]  # [M, D] (or halves)
        return (*[acc * alpha[:, None] + pv for acc, pv in zip(accs, pvs)], m_new, l)

    def key_loop(carry, lo, hi, num_kb, first_visible, **source):
        """The blocks of columns lo.. below hi; `diagonal_mask` (prefill): those every query row sees whole
        (below `first_visible`, the block's first token's last visible column + 1; no window) skip the mask, which
        only the one or two blocks on the diagonal build. Decode (one token a program, memory-bound, a few key
        blocks a split) keeps one loop: the mask is not what bounds it."""
        unmasked = 0
        if window is None and diagonal_mask and block_q > 1:
            unmasked = jnp.clip((jnp.minimum(hi, first_visible) - lo) // block_k, 0, num_kb)
            carry = lax.fori_loop(0, unmasked, functools.partial(body, masked=False, lo=lo, hi=hi, **source), carry)
        return lax.fori_loop(unmasked, num_kb, functools.partial(body, masked=True, lo=lo, hi=hi, **source), carry)

    carry = (*[jnp.zeros((rows_m, c.shape[0]), jnp.float32) for c in col_sets],
             jnp.full((rows_m,), -jnp.inf, jnp.float32), jnp.zeros((rows_m,), jnp.float32))
    if own_k_ref is not None:  # the own keys first: the softmax's order of keys does not change its result

        def own_index(col0):
            j = jnp.minimum(own_first + col0 + jnp.arange(block_k, dtype=jnp.int32), num_tokens - 1)
            return j * kv_heads + h

        carry = key_loop(carry, own_lo, own_hi, own_kb, first_pos + 1 - prefix, key_offset=prefix,
                         kv_index=own_index, own=True)

    def cache_index(col0):
        return table_ref[row, pl.ds(col0, block_k)] * kv_heads + h

    *accs, m, l = key_loop(carry, lo, hi, num_kb, first_pos + 1, key_offset=None, kv_index=cache_index, own=False)
    safe_l = jnp.where(l > 0, l, 1.0)
    outs = [acc / safe_l[:, None] for acc in accs]
    # Invalid rows store (masked) past the end: interpret mode rewrites masked lanes, and a duplicate of a
    # valid row's index would undo that row's write; on the GPU masked lanes touch nothing.
    out_rows = out_refs[0].shape[0]
    if not split:
        (o_ref,) = out_refs
        dst = jnp.where(valid, q_idx, out_rows + r)
        for out, c in zip(outs, col_sets):
            pltriton.store(o_ref.at[dst[:, None], c[None, :]], out.astype(o_ref.dtype), mask=row_mask)
        return
    o_ref, lse_ref = out_refs
    dst = jnp.where(valid, s * (num_tokens * heads) + q_idx, out_rows + r)
    for out, c in zip(outs, col_sets):
        pltriton.store(o_ref.at[dst[:, None], c[None, :]], out, mask=row_mask)
    lse = jnp.where(l > 0, m + jnp.log2(safe_l), -jnp.inf)  # base-2 log-sum-exp of the split
    pltriton.store(lse_ref.at[dst], lse, mask=valid)


def paged_attention(
    q,  # [n, heads, head_dim]
    k_cache,  # [slots + 1, kv_heads, head_dim] bf16/fp16/f32 or int8; int16 [.., head_dim / 2] for "pairs"
    v_cache,
    positions,  # [n] int32
    slot_table,  # [rows, width] int32
    blocks: plan.QueryBlocks,
    *,
    scale: float,
    block_q: int,
    k_scale=None,  # [slots + 1, kv_heads] float32 for int8 caches
    v_scale=None,
    block_k: int = 64,
    splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 2,
    owns_all_tokens: bool = False,
    interpret: bool = False,
    window: int | None = None,
    softcap: float | None = None,
    alibi_slopes=None,  # [heads] float32
    return_lse: bool = False,
    dequant: str = "cast",
    key_limit=None,  # [rows] int32
    fresh_kv=None,  # (k, v) [n, kv_heads, head_dim] in q's dtype
    diagonal_mask: bool = False,
):
    """Causal attention of packed query tokens over their rows' cached keys (already written).

    `blocks` says which tokens each program owns (plan.decode_blocks / plan.ragged_blocks, built with the
    same `block_q`). Token t of a block sees keys at table columns 0..positions[t]. Tokens outside every
    block come back as zeros, unless `owns_all_tokens` says there are none (decode), which saves clearing
    the output. `splits` > 1 is split-K (flash-decoding): each split covers a range of keys and
    `splitk.combine` merges them. Per-layer options as in reference.py: `window` (keys at positions >
    the token's - window; the key loop starts at the block's first window), `softcap`, `alibi_slopes`.
    A head_dim that is not a power of two (Phi-3's 96) is padded to one in registers with masked loads.
    `key_limit[r]`: row r's tokens see only its table columns below it (a cached prefix without the step's own
    tokens: fresh_prefill.py). `fresh_kv` = (k, v), with
    `key_limit` each row's cached prefix: its tokens also see the row's own new keys, packed in these arrays as
    the tokens are in q, at positions from the prefix on (fresh_prefill.py: a prefill chunk's own keys in 16
    bits, the prefix from an int8 cache), in the same program: a loop over its own keys, then one over the
    cache's.
    `dequant`: how an int8 cache becomes dot operands (int8_dequant.py; "pairs" takes the cache as int16 pairs,
    `int8_dequant.as_pairs`).
    Returns [n, heads, head_dim] in q's dtype; `return_lse` (one key split only): (float32 output, the
    base-2 log-sum-exp of each token's scaled scores [n, heads], -inf where it saw no key), to be merged
    with another attention over other keys (`splitk.combine`).
    """
    n, heads, head_dim = q.shape
    num_slots, kv_heads, cache_dim = k_cache.shape
    int8_dequant.check(dequant)
    paired = k_scale is not None and dequant == "pairs"
    if paired != int8_dequant.is_paired(k_cache) or cache_dim != (head_dim // 2 if paired else head_dim):
        raise ValueError(f"int8 dequant {dequant!r} with a {k_cache.dtype} cache of rows of {cache_dim} for head_dim "
                         f"{head_dim}: \"pairs\" takes int16 pairs [.., head_dim / 2], the others int8 [.., head_dim]")
    if paired and not int8_dequant.pairs_fit(head_dim):
        raise ValueError(f"int8 dequant \"pairs\" takes head dims that are powers of two ≥ 32, not {head_dim}")
    group = heads // kv_heads
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if head_dim < 16 or head_dim % 16:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 16 for the Triton kernel")
    if return_lse and splits > 1:
        raise ValueError("return_lse takes one key split")
    if num_slots * kv_heads * cache_dim >= 2**31:
        raise ValueError("a KV buffer of 2**31 elements or more overflows the kernel's int32 offsets")
    rows_m = max(16, _next_pow2(block_q * group))
    table = plan.pad_table(slot_table, block_k, num_slots - 1)
    width = table.shape[1]
    split_len = plan.split_length(width, splits, block_k)
    num_blocks = blocks.row.shape[0]
    quantised = k_scale is not None
    dequant = dequant if quantised else "cast"

    kernel = functools.partial(
        _kernel,
        heads=heads,
        kv_heads=kv_heads,
        rows_m=rows_m,
        block_q=block_q,
        block_k=block_k,
        split_len=split_len,
        num_tokens=n,
        scale=scale,
        split=splits > 1 or return_lse,
        head_dim=None if head_dim & (head_dim - 1) == 0 else head_dim,
        window=window,
        softcap=softcap,
        dequant=dequant,
        diagonal_mask=diagonal_mask,
        interpret=interpret,
    )
    kernel = functools.partial(_with_optional_inputs, kernel, quantised, alibi_slopes is not None,
                               key_limit is not None, fresh_kv is not None)
    if splits > 1 or return_lse:
        out_shape = (
            jax.ShapeDtypeStruct((splits * n * heads, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((splits * n * heads,), jnp.float32),
        )
    else:
        out_shape = (jax.ShapeDtypeStruct((n * heads, head_dim), q.dtype),)
    args = [
        blocks.row,
        blocks.start,
        blocks.count,
        positions.astype(jnp.int32),
        table,
        q.reshape(n * heads, head_dim),
        k_cache.reshape(num_slots * kv_heads, cache_dim),
        v_cache.reshape(num_slots * kv_heads, cache_dim),
    ]
    if quantised:
        args += [k_scale.reshape(-1).astype(jnp.float32), v_scale.reshape(-1).astype(jnp.float32)]
    if alibi_slopes is not None:
        args.append(alibi_slopes.astype(jnp.float32))
    if key_limit is not None:
        args.append(key_limit.astype(jnp.int32))
    if fresh_kv is not None:
        if key_limit is None:
            raise ValueError("fresh_kv needs key_limit: each row's cached prefix before its own keys")
        if paired:  # even columns, then odd ones: the halves the "pairs" accumulators take, contiguous
            fresh_kv = [x.reshape(n, kv_heads, head_dim // 2, 2).swapaxes(-1, -2) for x in fresh_kv]
        args += [x.astype(q.dtype).reshape(n * kv_heads, head_dim) for x in fresh_kv]
    # Outputs start as zeros (aliased inputs) so tokens no block owns read back as 0 (and as empty splits).
    inits = []
    if not owns_all_tokens:
        inits = [jnp.zeros(o.shape, o.dtype) for o in out_shape]
        if len(out_shape) == 2:
            inits[1] = jnp.full(out_shape[1].shape, -jnp.inf, jnp.float32)
    first_out = len(args)
    outs = pl.pallas_call(
        functools.partial(_with_inits, kernel, len(inits)),
        out_shape=out_shape,
        grid=(num_blocks, kv_heads, splits),
        input_output_aliases={first_out + j: j for j in range(len(inits))},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_int8" if quantised else "paged_attention",
    )(*args, *inits)
    if return_lse:
        return outs[0].reshape(n, heads, head_dim), outs[1].reshape(n, heads)
    if splits == 1:
        return outs[0].reshape(n, heads, head_dim)
    o_part, lse = outs
    from kernels.pallas import splitk

    return splitk.combine(
        o_part.reshape(splits, n, heads, head_dim), lse.reshape(splits, n, heads)
    ).astype(q.dtype)


def _with_optional_inputs(kernel, quantised: bool, alibi: bool, limited: bool, fresh: bool, *refs):
    # Float caches have no scale inputs, most models no ALiBi slopes, most calls no key limit and no own keys:
    # pass None where the kernel expects them.
    refs = list(refs)
    scales = refs[8:10] if quantised else [None, None]
    rest = refs[10:] if quantised else refs[8:]
    slopes = rest.pop(0) if alibi else None
    limit = rest.pop(0) if limited else None
    own = [rest.pop(0) for _ in range(2)] if fresh else [None, None]
    return kernel(*refs[:8], *scales, slopes, limit, *own, *rest)


def _with_inits(kernel, num_inits, *refs):
    # Aliased init inputs sit between the real inputs and the outputs; the kernel never reads them.
    if not num_inits:
        return kernel(*refs)
    ins, outs = refs[: -2 * num_inits], refs[-num_inits:]
    return kernel(*ins, *outs)
