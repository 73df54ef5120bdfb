"""jaxllm's int4 groups in numpy, for the calibrated converters (GPTQ, AWQ): the same arithmetic as
`jaxllm.models.quant.quantize_int4` (asymmetric, zero point, `group` consecutive inputs of the last input
axis; the scale rounded to its stored dtype before any value is rounded), with an optional shrunk range per
group, and the packing into the model's Int4Weight."""

from __future__ import annotations

import numpy as np


def range_params(lo: np.ndarray, hi: np.ndarray, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """A group's range [lo ≤ 0, hi ≥ 0] → (scale, zero) as quantize_int4 computes them, scale rounded to
    `scale_dtype` (returned as float64)."""
    xp = _array_module(lo)
    scale = ((hi - lo) / 15.0).astype(scale_dtype).astype(hi.dtype)
    safe = xp.where(scale > 0, scale, 1.0)
    zero = xp.clip(xp.round(-lo / safe), 0, 15)
    return scale, zero


def quantize_groups(w, group: int, scale_dtype=np.float32, shrink=1.0):
    """w [K, N] → (q [K, N] int32 0..15, scale [K / group, N], zero [K / group, N]); each group's range is its
    min / max (with 0) times `shrink` (a scalar or [K / group, N]): values outside are clipped. numpy arrays
    are computed in float64, jax arrays (under jit, for the searches) in their own dtype."""
    xp = _array_module(w)
    k, n = w.shape
    grouped = (w.astype(np.float64) if xp is np else w).reshape(k // group, group, n)
    lo = xp.minimum(grouped.min(axis=1), 0.0) * shrink
    hi = xp.maximum(grouped.max(axis=1), 0.0) * shrink
    scale, zero = range_params(lo, hi, scale_dtype)
    safe = xp.where(scale > 0, scale, 1.0)
    q = xp.clip(xp.round(grouped / safe[:, None]) + zero[:, None], 0, 15)
    return q.reshape(k, n).astype(np.int32), scale, zero


def _array_module(a):
    if isinstance(a, np.ndarray):
        return np
    import jax.numpy as jnp

    return jnp


def dequantize(q, scale, zero):
    xp = _array_module(scale)
    group = q.shape[0] // scale.shape[0]
    return (q - xp.repeat(zero, group, 0)) * xp.repeat(scale, group, 0)


def int4_weight(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, like):
    """The Int4Weight of `like`'s layout from q [K, N], scale and zero [K / group, N] (K: the flattened inputs,
    N: the flattened outputs)."""
    import jax.numpy as jnp

    from jaxllm.models import quant

    axis = like.in_axes - 1
    shape = like.shape
    in_shape, out_shape = shape[: like.in_axes], shape[like.in_axes :]
    packed = quant.pack_int4(jnp.asarray(q.reshape(*in_shape, *out_shape)), axis=axis)
    grouped = (*in_shape[:-1], in_shape[-1] // like.group_size, *out_shape)
    dtype = like.scale.dtype
    return quant.Int4Weight(packed, jnp.asarray(scale.reshape(grouped), dtype), jnp.asarray(zero.reshape(grouped), dtype),
                            like.in_axes)
