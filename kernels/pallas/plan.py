"""Work planning shared by the kernels: query blocks of a ragged batch, key splits, table padding, block sizes.

Everything here is plain JAX on small int32 arrays (per row or per block), traced into the same jitted step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Programs per multiprocessor the split-K heuristic aims for (a few waves hide the tail).
_PROGRAMS_PER_SM = 4
# Fewest keys a split should hold: shorter splits cost more in the combine pass than they save.
_MIN_SPLIT_KEYS = 256
# Hopper H100/H200 multiprocessors: the default when the device does not say.
_DEFAULT_SMS = 132


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QueryBlocks:
    """Which packed tokens each program of the kernel owns: up to `block_q` consecutive tokens of one row."""

    row: jax.Array  # [blocks] int32: slot-table row of the block
    start: jax.Array  # [blocks] int32: packed index of the block's first token
    count: jax.Array  # [blocks] int32: tokens in the block (0 for an unused block)


def decode_blocks(rows: int) -> QueryBlocks:
    """Decode: token i is row i's only query, one block per row."""
    ids = jnp.arange(rows, dtype=jnp.int32)
    return QueryBlocks(row=ids, start=ids, count=jnp.ones((rows,), jnp.int32))


def ragged_blocks(query_start, query_lens, num_tokens: int, block_q: int) -> QueryBlocks:
    """Cut each row's new tokens `[query_start[r], +query_lens[r])` into blocks of `block_q`.

    The block count is static: ceil(num_tokens / block_q) + rows bounds sum(ceil(len / block_q)).
    Unused trailing blocks have count 0.
    """
    rows = query_start.shape[0]
    num_blocks = -(-num_tokens // block_q) + rows
    per_row = (query_lens + block_q - 1) // block_q  # [rows]
    ends = jnp.cumsum(per_row)  # [rows] inclusive
    b = jnp.arange(num_blocks, dtype=jnp.int32)
    row = jnp.searchsorted(ends, b, side="right").astype(jnp.int32)  # [blocks]; == rows when unused
    row_c = jnp.minimum(row, rows - 1)
    j = b - (ends[row_c] - per_row[row_c])  # block index within its row
    start = query_start[row_c] + j * block_q
    count = jnp.clip(query_lens[row_c] - j * block_q, 0, block_q)
    count = jnp.where(row < rows, count, 0)
    return QueryBlocks(row=row_c, start=start.astype(jnp.int32), count=count.astype(jnp.int32))


def num_sms() -> int:
    """Multiprocessors of the default device (132 when it does not say, e.g. on CPU)."""
    count = getattr(jax.devices()[0], "core_count", None)
    return int(count) if isinstance(count, int) and count > 1 else _DEFAULT_SMS


def decode_splits(programs: int, width: int, block_k: int, policy: str) -> int:
    """Key splits for split-K decode: `programs` = rows × kv heads, `width` = slot-table width.

    policy "never": 1. "auto": split only when the programs fill less than two waves of the machine.
    "always": at least 2 whenever the table holds two key blocks. Each split keeps ≥ _MIN_SPLIT_KEYS keys.
    """
    if policy not in ("never", "auto", "always"):
        raise ValueError(f"unknown split policy {policy!r}")
    most = max(1, min(width // _MIN_SPLIT_KEYS, -(-width // block_k)))
    if policy == "never":
        return 1
    sms = num_sms()
    wanted = 1 if programs >= 2 * sms else math.ceil(_PROGRAMS_PER_SM * sms / programs)
    if policy == "always":
        wanted = max(wanted, 2)
        most = max(most, min(2, -(-width // block_k)))
    return max(1, min(wanted, most))


def split_length(width: int, splits: int, block_k: int) -> int:
    """Keys per split: a multiple of `block_k` covering `width` in `splits` pieces."""
    blocks = -(-width // block_k)
    return -(-blocks // splits) * block_k


def pad_table(slot_table, multiple: int, fill: int):
    """Pad the table's columns to a multiple of `multiple` with `fill` (the scratch slot)."""
    width = slot_table.shape[1]
    extra = -width % multiple
    if extra == 0:
        return slot_table
    return jnp.pad(slot_table, ((0, 0), (0, extra)), constant_values=fill)


def pow2_divisor(dim: int, wanted: int, minimum: int) -> int | None:
    """The largest power-of-two block from `wanted` down to `minimum` that divides `dim` (None if none does)."""
    block = wanted
    while block >= minimum:
        if dim % block == 0:
            return block
        block //= 2
    return None
