"""One step's host-prepared inputs (StepInputs) and their packing into two buffers: two host-to-device transfers
per step instead of two dozen."""

from __future__ import annotations

import jax
import numpy as np
from flax import struct

from jaxllm.engine.sampler import SamplingBatch


@struct.dataclass
class StepInputs:
    """One step's host-prepared arrays, padded: T tokens (packed rows), R rows."""

    tokens: jax.Array  # [T] i32: host-known ids (0 where the id comes from the device)
    token_src: jax.Array  # [T] i32: -1, or the row of the previous step whose sampled id is this token
    positions: jax.Array  # [T] i32
    token_row: jax.Array  # [T] i32: the token's row in this step
    write_slots: jax.Array  # [T] i32: KV slot written (the scratch slot for padding)
    target_ids: jax.Array  # [T] i32: next prompt id, for prompt logprobs
    kv_rows: jax.Array  # [R] i32: each row's row of the device tables (the scratch row for padding)
    context_lens: jax.Array  # [R] i32
    query_start: jax.Array  # [R] i32
    query_lens: jax.Array  # [R] i32
    logits_index: jax.Array  # [R] i32
    image_rows: jax.Array  # [T] i32: the token's row of the image-embedding buffer, -1 for a text token
    sampling: SamplingBatch
    rope_positions: jax.Array | None = None  # [3, T] i32: an M-RoPE model's rotary positions (t, h, w)


def pack(host: StepInputs):
    """All of a step's host arrays in two buffers (int32, float32): two transfers instead of two dozen.
    Returns (ints, floats, layout); `layout` (static) lets the step unpack them."""
    leaves, treedef = jax.tree.flatten(host)
    ints = [a.view(np.int32).ravel() for a in leaves if a.dtype.kind in "iu"]
    floats = [a.ravel() for a in leaves if a.dtype.kind == "f"]
    layout = (treedef, tuple((a.shape, a.dtype.str) for a in leaves))
    return np.concatenate(ints), np.concatenate(floats).astype(np.float32), layout


def unpack(ints, floats, layout) -> StepInputs:
    """Inside the step: the StepInputs that `pack` flattened."""
    treedef, specs = layout
    leaves, at = [], {"i": 0, "f": 0}
    for shape, dtype in specs:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape))
        kind = "f" if dtype.kind == "f" else "i"
        buffer = floats if kind == "f" else ints
        leaf = buffer[at[kind] : at[kind] + size].reshape(shape)
        at[kind] += size
        leaves.append(jax.lax.bitcast_convert_type(leaf, dtype) if kind == "i" and dtype != np.int32 else leaf)
    return jax.tree.unflatten(treedef, leaves)
