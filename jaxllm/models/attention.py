"""Attention step metadata and the attention backends the model calls (reference or Pallas kernels).

A step runs `n` packed tokens belonging to `rows` requests. Every array is an explicit argument of the
jitted step; `decode_only` (one token per request, token i belongs to row i) is static.
"""

from __future__ import annotations

from typing import Any, Protocol

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kernels.pallas import reference


@struct.dataclass
class AttentionMetadata:
    positions: Any  # [n] int32: each token's position in its request
    token_req: Any  # [n] int32: row of slot_table the token belongs to
    write_slots: Any  # [n] int32: KV slot the token's key/value is written to (scratch slot for padding)
    slot_table: Any  # [rows, width] int32: request row → KV slot of each position
    context_lens: Any  # [rows] int32: keys visible to the row's last token after this step
    query_start: Any  # [rows] int32: index of the row's first token in the packed batch
    query_lens: Any  # [rows] int32: tokens the row brings this step (0 for a padding row)
    logits_index: Any  # [rows] int32: packed index of the token whose next-token logits are sampled
    # [3, n] int32: M-RoPE models' rotary positions (temporal, height, width), which differ from `positions`
    # on image tokens and after them; None: the rotary position is `positions`.
    rope_positions: Any = None
    decode_only: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def for_sequences(
        cls, chunks: list[tuple[int, int]], slot_rows: list[list[int]], scratch_slot: int, width: int
    ) -> "AttentionMetadata":
        """Host-side builder, no padding: `chunks[r] = (start_position, n_new_tokens)` per request,
        `slot_rows[r]` its KV slots for positions 0..start+n. Used by tests and simple callers."""
        positions, token_req, write_slots, starts, lens, last = [], [], [], [], [], []
        table = np.full((len(chunks), width), scratch_slot, np.int32)
        for row, ((start, count), slots) in enumerate(zip(chunks, slot_rows)):
            table[row, : len(slots)] = slots
            starts.append(len(positions))
            lens.append(count)
            for p in range(start, start + count):
                positions.append(p)
                token_req.append(row)
                write_slots.append(slots[p])
            last.append(len(positions) - 1)
        as_i32 = lambda xs: jnp.asarray(np.asarray(xs, np.int32))  # noqa: E731
        return cls(
            positions=as_i32(positions),
            token_req=as_i32(token_req),
            write_slots=as_i32(write_slots),
            slot_table=jnp.asarray(table),
            context_lens=as_i32([s + c for s, c in chunks]),
            query_start=as_i32(starts),
            query_lens=as_i32(lens),
            logits_index=as_i32(last),
            decode_only=all(c == 1 for _, c in chunks),
        )


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends (static): score scale, sliding window (a token sees the keys of its last
    `window` positions, its own included), soft-capping of the scores (`cap * tanh(s / cap)`)."""

    scale: float
    window: int | None = None
    softcap: float | None = None


class AttentionBackend(Protocol):
    """What a layer needs from attention: a cache format, a write, and a read. `alibi_slopes` [heads]
    float32, when given, adds `slope * (key position - query position)` to each head's scores. `fresh_kv` =
    (k, v): the keys and values the step just wrote, as computed: a backend may read the step's own tokens
    from them, rounded as its cache stores them, instead of from the cache (the same values, maybe faster)."""

    def init_layer_cache(self, num_slots: int, kv_heads: int, head_dim: int, dtype) -> tuple: ...

    def write(self, layer_cache: tuple, k, v, meta: AttentionMetadata) -> tuple: ...

    def attend(self, q, layer_cache: tuple, meta: AttentionMetadata, spec: AttentionSpec, alibi_slopes=None,
               fresh_kv=None): ...

    # Multi-head latent attention (models/mla.py) over its one-row-per-token cache: q [n, heads, kv_rank +
    # rope_dim] with the key up-projection absorbed; returns [n, heads, kv_rank].
    def attend_latent(self, q, cache, meta: AttentionMetadata, scale: float, kv_rank: int): ...

    # Whether a step's cost grows with its slot-table width (so the runner buckets widths) or only with
    # the context lengths (one width: fewer step shapes to compile).
    cost_follows_width: bool


@dataclasses.dataclass(frozen=True)  # no fields: every instance is equal, so all share one jit cache entry
class ReferenceAttention:
    """Plain-JAX attention (kernels/pallas/reference.py): the CPU path and the kernels' ground truth."""

    name = "reference"
    cost_follows_width = True  # gathers every column of the slot table

    def init_layer_cache(self, num_slots, kv_heads, head_dim, dtype):
        # One extra scratch slot at the end for padded tokens.
        shape = (num_slots + 1, kv_heads, head_dim)
        return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, layer_cache, k, v, meta):
        return reference.write_kv(*layer_cache, k, v, meta.write_slots)

    def attend(self, q, layer_cache, meta, spec, alibi_slopes=None, fresh_kv=None):
        # The cache holds the step's keys and values exactly: `fresh_kv` adds nothing to read.
        return attend_traced_once(self, q, layer_cache, meta, spec, alibi_slopes, None)

    def _attend(self, q, layer_cache, meta, spec, alibi_slopes, fresh_kv):
        k_cache, v_cache = layer_cache
        options = reference_options(spec, alibi_slopes)
        if meta.decode_only:
            return reference.decode_attention(
                q, k_cache, v_cache, meta.slot_table, meta.context_lens, spec.scale, **options
            )
        return reference.paged_attention(
            q, k_cache, v_cache, meta.token_req, meta.positions, meta.slot_table, spec.scale, **options
        )

    @staticmethod
    def attend_latent(q, cache, meta, scale, kv_rank):
        return reference.latent_attention(q, cache, meta.token_req, meta.positions, meta.slot_table, scale, kv_rank)


@functools.partial(jax.jit, static_argnums=(0, 4))
def attend_traced_once(backend, q, layer_cache, meta: AttentionMetadata, spec: AttentionSpec, alibi_slopes,
                       fresh_kv):
    """`backend._attend(...)` as one nested jit: the layers of a step (same shapes, same spec) share one
    trace and one lowering of their attention instead of one per layer (a 30-layer CPU step shape traced
    in ~1/3 less time; on the GPU a 32-layer shape took 0.3 s to trace and lower instead of 1.0 s)."""
    return backend._attend(q, layer_cache, meta, spec, alibi_slopes, fresh_kv)


def reference_options(spec: AttentionSpec, alibi_slopes) -> dict:
    """The keyword arguments of `kernels/pallas/reference.py`'s attention for a layer's spec."""
    return dict(window=spec.window, softcap=spec.softcap, alibi_slopes=alibi_slopes)
