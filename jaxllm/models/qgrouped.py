"""`grouped_dot(x, w, group_sizes)`: rows grouped by expert times their expert's matrix, for a MoE layer's
stacked experts quantised like the dense weights (`jaxllm/models/quant.py`, one leading experts axis).

Plain JAX on every platform, one `lax.ragged_dot_general` per product on the stored layout ([E, out, in] for
int8 / fp8: the weight's contracting axis is its last, no transposed copy):
- w8a16: the int8 weights converted to the activations' dtype inside the product, the per-output-channel scale
  applied to the product's rows afterwards (exact: the scale is constant along the contraction), so no
  scaled weight is formed (on the CPU XLA still converts the layer's experts to 16 bits for its ragged dot);
  on a single GPU past PALLAS_MIN_ROWS rows, our Pallas grouped matmul instead, its int8 blocks converted in
  registers and the scale applied to its accumulator;
- w8a8 / fp8_w8a8: activations quantised per row at run time, an int8 × int8 → int32 (e4m3 × e4m3 → float32)
  ragged product, both scales applied afterwards;
- w4a16: the experts dequantised to the activations' dtype, then the product (XLA fuses the unpacking where it
  can; on the CPU the dequantised experts are a temporary of the step).
Quantised experts take these products on every platform and `--tp` (XLA partitions them like the 16-bit
experts), not `expert_kernels.py`'s choice among 16-bit kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.models import quant
from jaxllm.models.layers import grouped_dense
from jaxllm.models.qdot import kernels_enabled
from kernels.pallas import reference
from kernels.pallas.grouped_matmul import grouped_matmul, supports

# Rows from which w8a16 experts take the Pallas kernel on a single GPU: the bf16 experts' measured crossing
# (`expert_kernels.RAGGED_DOT_MAX_TOKENS`: XLA's ragged dot up to 128 tokens, Pallas above), not yet measured
# for int8 weights (`python -m jaxllm.bench.experts --quant w8a16` times both).
PALLAS_MIN_ROWS = 2 * 128 + 1  # (token, expert) pairs at top-2
INT8_KERNELS = ("auto", "xla", "pallas")

# x [m, K] (rows ragged by group) · w [E, N, K] (groups leading, contracting on the last axis) → [m, N]
_OUT_MAJOR = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (2,)), ((), ())),
                                               lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def merged_outputs(w):
    """Stacked matrices [E, K, *out] → [E, K, prod(out)] (gate and up as one product), a quantised weight's
    fields alike (their output axes merged in the same order)."""
    if not quant.is_quantised(w):
        return w.reshape(w.shape[0], w.shape[1], -1)
    if w.lead_axes != 1 or w.in_axes != 1:
        raise ValueError(f"grouped products take [experts, in, *out] weights, not lead_axes={w.lead_axes}, "
                         f"in_axes={w.in_axes}")
    if isinstance(w, quant.Int4Weight):  # packed / scale / zero [E, K / 8 | groups, *out]
        return w.replace(packed=_merge_from(w.packed, 2), scale=_merge_from(w.scale, 2), zero=_merge_from(w.zero, 2))
    return w.replace(data=w.data.reshape(w.data.shape[0], -1, w.data.shape[-1]), scale=_merge_from(w.scale, 1))


def expert_of(w, e):
    """Expert `e` (a traced index) of stacked matrices [E, ...]: its plain matrix, or its quantised weight alone
    (what `qdot.dot` multiplies)."""
    take = lambda a: jax.lax.dynamic_index_in_dim(a, e, keepdims=False)  # noqa: E731
    return jax.tree.map(take, w).replace(lead_axes=0) if quant.is_quantised(w) else take(w)


def _merge_from(a, axis: int):
    return a.reshape(*a.shape[:axis], -1)


def grouped_dot(x, w, group_sizes, grouped=grouped_dense, int8_kernel: str = "auto"):
    """x [m, K] (group g's rows contiguous, in group order) · w [E, K, N] → [m, N] in x's dtype; a plain `w`
    goes to `grouped` (`layers.grouped_dense` or a kernel), a quantised one (fields merged to one output
    axis, `merged_outputs`) to its product here. `int8_kernel` (w8a16): one of INT8_KERNELS ("pallas" on the
    CPU: interpret mode)."""
    if not quant.is_quantised(w):
        return grouped(x, w, group_sizes)
    if int8_kernel not in INT8_KERNELS:
        raise ValueError(f"int8 grouped kernel {int8_kernel!r} is not one of {', '.join(INT8_KERNELS)}")
    if isinstance(w, quant.Int4Weight):
        weights = quant.dequantize(w, x.dtype)  # [E, K, N]
        return jax.lax.ragged_dot(x, weights, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    if isinstance(w, quant.Fp8Weight):
        x_q, x_scale = reference.quantize_rows_fp8(x)
        out = _ragged(x_q, w.data, group_sizes, jnp.float32) * x_scale[:, None]
    elif w.int8_activations:
        x_q, x_scale = reference.quantize_rows_int8(x)
        out = _ragged(x_q, w.data, group_sizes, jnp.int32).astype(jnp.float32) * x_scale[:, None]
    elif _pallas_int8(int8_kernel, x, w.data):
        return grouped_matmul(x, w.data, group_sizes, scale=w.scale, interpret=jax.default_backend() == "cpu")
    else:
        out = _ragged(x, w.data.astype(x.dtype), group_sizes, jnp.float32)
    return (out * w.scale[group_of_rows(group_sizes, x.shape[0])]).astype(x.dtype)


def _pallas_int8(int8_kernel: str, x, data) -> bool:
    if int8_kernel == "auto":
        rows, k = x.shape
        return kernels_enabled() and rows >= PALLAS_MIN_ROWS and supports(rows, k, data.shape[1], data.size)
    return int8_kernel == "pallas"


def _ragged(x, data, group_sizes, out_dtype):
    return jax.lax.ragged_dot_general(x, data, group_sizes, _OUT_MAJOR, preferred_element_type=out_dtype)


def group_of_rows(group_sizes, rows: int):
    """Each row's group [rows] (rows past the groups: the last group; their products are zeros)."""
    return jnp.repeat(jnp.arange(group_sizes.shape[0], dtype=jnp.int32), group_sizes, total_repeat_length=rows)
