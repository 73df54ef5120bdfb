"""`dot(x, w)`: the one product of activations and a weight in the models, whatever the weight's type.

x [n, *in] @ w [*in, *out] → [n, *out] in x's dtype. A plain array is an XLA dot; a quantised weight
(`jaxllm/models/quant.py`) runs, for the weight-only schemes, the Pallas kernels of
`kernels/pallas/quant_gemv.py` (int4 matrix-vector, one or two rows; int8 where W8_GEMV_MAX_ROWS says; either
folding a norm before it where W4_GEMV_FOLDS_NORM / W8_GEMV_MAX_ROWS say) and `kernels/pallas/quant_matmul.py`,
or `kernels/pallas/two_digit_matmul.py` (w8a16, one row: a norm before the product, handed over unapplied as
`NormedRows`, is folded into x's digits), on a single GPU at decode-sized row counts, and an XLA dot of the
dequantised weights otherwise (larger row counts, the CPU, and `--tp` > 1, where XLA's partitioner splits the
product like its 16-bit twin's, without gathering a weight: the kernels under shard_map are not built yet);
w8a8 and fp8 run XLA's int8 / fp8 GEMMs on per-token quantised activations (a norm handed over unapplied folds
into the quantisation: x ⊙ weight is quantised and 1/rms joins the row's scale; on a single GPU the quantisation,
with that norm or a gated MLP's silu(gate) · up, is one Pallas kernel a row: `kernels/pallas/row_quant.py`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.models.normed import GatedRows, NormedRows
from jaxllm.models.quant import Fp8Weight, Int4Weight, Int8Weight, is_quantised
from kernels.pallas import quant_gemv, quant_matmul, reference, row_quant, two_digit_matmul


def dot(x, w):
    """x [n, *in] @ w [*in, *out] → [n, *out] (the contraction of x's trailing axes with w's leading ones). x may
    be `NormedRows` (rows whose RMS norm is not applied yet) or `GatedRows` (act(gate) · up not formed yet): the
    weight-only kernels that can fold the norm into their prologue, and the per-token quantisation of w8a8 / fp8,
    take the raw rows; every other product takes the step's output."""
    if isinstance(x, (NormedRows, GatedRows)):
        out = _normed_weight_only(x, w) if isinstance(x, NormedRows) else None
        if out is None and _per_token(w) and w.in_axes == 1:  # the step folds into the rows' quantisation
            out = _xla_matmul(x, w, x.shape[1], w.shape[1:])
        if out is not None:
            return out
        x = x.value()
    if not is_quantised(w):
        return jnp.tensordot(x, w, axes=x.ndim - 1)
    n, k = x.shape[0], math.prod(x.shape[1:])
    out_shape = w.shape[w.in_axes:]
    x = x.reshape(n, k)
    out = _kernel_matmul(x, w, k, math.prod(out_shape))
    if out is not None:
        return out.reshape(n, *out_shape)
    return _xla_matmul(x, w, k, out_shape)


# Which kernel per row count (docs/perf.md, "Weight quantisation: one-row products", H200): w8a16 runs XLA's int8
# GEMM on x's two int8 digits (kernels/pallas/two_digit_matmul.py) at W8_DIGITS_MAX_ROWS rows (3.4 TB/s at one row,
# session 16; more rows not measured yet), our int8 tensor-core kernel up to W8_KERNEL_MAX_ROWS rows (3.1 TB/s at
# one row, against 2.2 for XLA's dot with the int8 → bf16 convert fused into it) and XLA's fused dot above (faster
# from 8 rows on); w4a16 runs the matrix-vector kernel up to quant_gemv.MAX_ROWS rows, our int4 tensor-core kernel
# up to KERNEL_MAX_ROWS and XLA's dot of dequantised weights above. w8a8 and fp8 always take XLA's integer / fp8
# GEMMs on [out, in] weights, which measured faster than our int8 × int8 kernel at every row count.
# The fp8 GEMM's output before the scales: bf16 (half the bytes the GEMM writes and its consumer reads; one more
# rounding, of about the output's own). H200, batch 256 (docs/perf.md, session 24): the products 10-27 % faster
# than with a float32 output, the 32-layer step 7.21 against 7.33 ms (7.36 against 7.42 on another machine).
FP8_PRODUCT_DTYPE = jnp.bfloat16
W8_DIGITS_MAX_ROWS = 1
# w8a16 rows up to this many (one at most) take the int8 matrix-vector kernel in packed fp16 instead of the digits
# (quant_gemv's "f16": bf16 x read as it is, a norm before it folded into the kernel, no digits, no int32 sums to
# combine). Off: on the H200 it was 12-18 % slower than the digits per product, and the engine's one-row w8a16
# step with it gave 234 against 325 tok/s (docs/perf.md, session 24, before its norm pass lost a barrier a step).
W8_GEMV_MAX_ROWS = 0
# Whether the int4 matrix-vector kernel applies the norm before q/k/v and gate/up itself (no norm kernels there).
# Off: on the H200 it saved 2.9 µs on qkv and cost 11.9 µs on gate_up at one row, more than the two norm launches
# it removes (docs/perf.md, session 25).
W4_GEMV_FOLDS_NORM = False
W8_KERNEL_MAX_ROWS = 4
KERNEL_MAX_ROWS = 64
# The two digits (and a norm before them) from one Pallas kernel a row instead of XLA's reductions and
# concatenation, up to this many rows. Off: on the H200 the product alone was faster with it, the engine's one-row
# step 0.29 ms slower (docs/perf.md, session 20).
W8_DIGITS_KERNEL_MAX_ROWS = 0
# The per-token quantisation of w8a8 / fp8 activations (with the norm or the gated activation before it) as one
# Pallas kernel a row on a single GPU (kernels/pallas/row_quant.py), not XLA's reductions and casts. Off: its first
# form (two passes over 2,048-input chunks, 4 warps) made the batch-256 step slower on the H200, fp8 7.57 against
# 7.09 ms and w8a8 8.75 against 8.08 (docs/perf.md, session 25); its form now (chunks of up to 8,192 inputs, the
# last masked, so two at most for Llama-3-8B) too, fp8 7.33 against 7.05 and w8a8 8.38 against 8.07 (session 26).
ROW_QUANT_KERNEL = False


def _kernel_matmul(x, w, k: int, n: int):
    """x [m, k] → [m, n] by one of our kernels (a single GPU, weight-only schemes, sizes they take), or None."""
    m = x.shape[0]
    if not kernels_enabled():
        return None
    if isinstance(w, Int8Weight) and not w.int8_activations:
        data, scale = _int8_arrays(w, k, n)
        if _takes_int8_gemv(w, m, k, n):
            return quant_gemv.int8_gemv(x, data, scale)
        if _takes_two_digits(w, m, k):
            return _two_digit(x, data, scale)
        if m <= W8_KERNEL_MAX_ROWS and quant_matmul.supports(k, n):
            return quant_matmul.int8_matmul(x, data, scale)
    elif isinstance(w, Int4Weight):
        packed, scale, zero = _int4_arrays(w, n)
        if quant_gemv.supports(k, n, m, group=w.group_size):
            return quant_gemv.int4_gemv(x, packed, scale, zero)
        if m <= KERNEL_MAX_ROWS and quant_matmul.supports(k, n, group=w.group_size):
            return quant_matmul.int4_matmul(x, packed, scale, zero)
    return None


def _int8_arrays(w: Int8Weight, k: int, n: int):
    """The kernels' view of an int8 weight: data [n, k], scale [n]."""
    return w.data.reshape(n, k), w.scale.reshape(n)


def _int4_arrays(w: Int4Weight, n: int):
    """The kernels' view of an int4 weight: packed [k / 8, n], scale and zero [k / group, n]."""
    return tuple(a.reshape(-1, n) for a in (w.packed, w.scale, w.zero))


def _takes_int8_gemv(w, m: int, k: int, n: int) -> bool:
    """Whether x [m, k] @ w runs the int8 matrix-vector kernel in packed fp16 (kernels enabled)."""
    return (isinstance(w, Int8Weight) and not w.int8_activations and m <= min(W8_GEMV_MAX_ROWS, 1)
            and quant_gemv.supports(k, n, m))


def _takes_two_digits(w, m: int, k: int) -> bool:
    """Whether x [m, k] @ w runs XLA's int8 GEMM on x's two int8 digits (kernels enabled)."""
    return (isinstance(w, Int8Weight) and not w.int8_activations and m <= W8_DIGITS_MAX_ROWS
            and two_digit_matmul.supports(k))


def _two_digit(x, data, scale, norm: NormedRows | None = None):
    """x [m, k] (or the rows of `norm`) @ (data [n, k] * scale [n])ᵀ through the digits."""
    m, k = x.shape
    kernel = m <= W8_DIGITS_KERNEL_MAX_ROWS and two_digit_matmul.kernel_supports(k)
    weight, eps, dtype = (None, 0.0, x.dtype) if norm is None else (norm.weight, norm.eps, norm.dtype)
    return two_digit_matmul.int8_matmul(x, data, scale, weight, eps, digits_kernel=kernel).astype(dtype)


def _normed_weight_only(rows: NormedRows, w):
    """rows' normalised values @ w when a weight-only product folds the norm in (the matrix-vector kernels, or
    the w8a16 digits), else None."""
    m, k = rows.shape
    if not kernels_enabled() or not isinstance(w, (Int8Weight, Int4Weight)) or w.in_axes != 1:
        return None
    out_shape = w.shape[w.in_axes:]
    n = math.prod(out_shape)
    sixteen_bit = jnp.dtype(rows.dtype).itemsize == 2
    if isinstance(w, Int4Weight):
        if not (W4_GEMV_FOLDS_NORM and sixteen_bit and quant_gemv.supports(k, n, m, group=w.group_size)):
            return None
        packed, scale, zero = _int4_arrays(w, n)
        out = quant_gemv.int4_gemv(rows.x.astype(rows.dtype), packed, scale, zero, rows.weight, rows.eps)
        return out.reshape(m, *out_shape)
    data, scale = _int8_arrays(w, k, n)
    if _takes_int8_gemv(w, m, k, n) and sixteen_bit:
        out = quant_gemv.int8_gemv(rows.x.astype(rows.dtype), data, scale, rows.weight, rows.eps)
    elif _takes_two_digits(w, m, k):
        out = _two_digit(rows.x, data, scale, rows)
    else:
        return None
    return out.reshape(m, *out_shape)


def _per_token(w) -> bool:
    """Whether `w`'s product quantises its activations per token (w8a8, fp8)."""
    return isinstance(w, Fp8Weight) or (isinstance(w, Int8Weight) and w.int8_activations)


def _quantized_rows(x, w):
    """x [m, k] (or the rows of NormedRows / GatedRows) quantised per token for w's scheme: (int8 or e4m3 [m, k],
    float32 scale [m]). On a single GPU one Pallas kernel a row (kernels/pallas/row_quant.py: XLA takes two to
    four launches); elsewhere XLA's ops, a norm's weight folded into the rows and its 1 / rms into their scale."""
    fp8 = isinstance(w, Fp8Weight)
    k = x.shape[1]
    gated_silu = not isinstance(x, GatedRows) or x.act is jax.nn.silu  # the kernel's one activation
    if ROW_QUANT_KERNEL and kernels_enabled() and row_quant.supports(k) and gated_silu:
        dtype = jnp.float8_e4m3fn if fp8 else jnp.int8
        if isinstance(x, NormedRows):
            return row_quant.quantize_rows(x.x, dtype, x.weight, x.eps)
        if isinstance(x, GatedRows):
            return row_quant.quantize_rows(x.h, dtype, gated=True)
        return row_quant.quantize_rows(x, dtype)
    quantise = reference.quantize_rows_fp8 if fp8 else reference.quantize_rows_int8
    if isinstance(x, NormedRows):
        x32 = x.x.astype(jnp.float32)
        q, scale = quantise(x32 * x.weight)
        return q, scale * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + x.eps)
    return quantise(x.value() if isinstance(x, GatedRows) else x)


def _xla_matmul(x, w, k: int, out_shape: tuple[int, ...]):
    """x [m, k] → [m, *out] by XLA's dots. Under --tp the output axes stay apart: merged, a weight split on a
    minor output axis (the MLP's [2, intermediate]) would be gathered by the partitioner, whole, every step. The
    per-token schemes also take NormedRows / GatedRows for x (`_quantized_rows`)."""
    if isinstance(w, Int4Weight):  # dequantised [k, *out]: the dot's usual operand layout, any number of outputs
        packed, scale, zero = (a.reshape(-1, *out_shape) for a in (w.packed, w.scale, w.zero))
        weights = reference.dequantize_int4(packed, scale, zero).astype(x.dtype)
        return jnp.tensordot(x, weights, axes=1, preferred_element_type=jnp.float32).astype(x.dtype)
    if not isinstance(w, (Int8Weight, Fp8Weight)):
        raise TypeError(f"no matmul for a weight of type {type(w).__name__}")
    data = w.data.reshape(*out_shape, k) if len(out_shape) > 1 and not single_device() else w.data.reshape(-1, k)
    per_row = (x.shape[0],) + (1,) * (data.ndim - 1)  # a per-row scale's broadcast shape
    if _per_token(w):
        x_q, x_scale = _quantized_rows(x, w)
        out = _dot_out_major(x_q, data, FP8_PRODUCT_DTYPE if isinstance(w, Fp8Weight) else jnp.int32)
        out = out.astype(jnp.float32) * x_scale.reshape(per_row)
    else:
        out = _dot_out_major(x, data.astype(x.dtype), jnp.float32)
    return (out * w.scale.reshape(data.shape[:-1])).astype(x.dtype).reshape(x.shape[0], *out_shape)


def _dot_out_major(x, data, out_dtype):
    """x [m, k] @ data [*out, k]ᵀ → [m, *out], accumulated in `out_dtype`. One output axis: the transposed-operand
    dot both backends run in place; more: the weight as the left operand ([*out, k] is its usual layout, so no
    backend copies it) and the small product transposed."""
    if data.ndim == 2:
        return reference.dot_nk(x, data, out_dtype)
    out = jax.lax.dot_general(data, x, (((data.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype)
    return jnp.moveaxis(out, -1, 0)


def kernels_enabled() -> bool:
    """Pallas kernels on a single GPU (no mesh, or a mesh of one device, in context); XLA otherwise."""
    return jax.default_backend() == "gpu" and single_device()


def single_device() -> bool:
    """Whether the step runs on one device (no mesh, or a mesh of one device, in context)."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.device_count() == 1 if mesh.empty else mesh.size == 1
