"""AWQ (Lin et al., 2023) for jaxllm's w4a16: activation-aware per-input-channel scales, then a clipping
search per int4 group, both chosen by the product's output error on the calibration rows.

Scaling: the inputs that carry large activations matter most to the output, so their weight rows are scaled
up (s_j = mean|x_j|^α, normalised) before int4 rounding and the input divided by s_j in the op before
(tools/convert/scaling.py: the RMSNorms before `qkv_proj` and the MLP, the up half of `gate_up_proj` for
`down_proj`); α per product from a grid (0: no scaling) by ‖x w - (x / s) Q(w s)‖ on the calibration rows.

Clipping: each (group, output) range [min, max] shrunk by the factor, from a grid, with the least output
error of that group's inputs (the group's block of the inputs' Gram matrix), trading clipped outliers for
finer steps where the activations say it pays.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tools.convert.int4 import dequantize, quantize_groups
from tools.convert.scaling import fold_scales

ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))
SHRINKS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 … 0.5


@functools.partial(jax.jit, static_argnames=("group", "scale_dtype"))
def _scale_errors(x, w, group: int, scale_dtype):
    """‖x w - (x / s) Q(w s)‖² for no scaling and each α of ALPHAS (s = mean|x|^α normalised), with
    (x / s) Q(w s) = x (Q(w s) / s) measured through the Gram matrix xᵀx."""
    gram = x.T @ x
    mean_abs = jnp.maximum(jnp.abs(x).mean(axis=0), 1e-5)

    def error(alpha):
        s = mean_abs**alpha
        s = s / jnp.sqrt(s.max() * s.min())
        diff = w - dequantize(*quantize_groups(w * s[:, None], group, scale_dtype)) / s[:, None]
        return jnp.sum(diff * (gram @ diff)), s

    return jax.lax.map(error, jnp.asarray((0.0,) + ALPHAS, jnp.float32))


def activation_scale(x: np.ndarray, w: np.ndarray, group: int, scale_dtype=np.float32):
    """(s [K], α) with the least int4 output error on the calibration rows x [R, K] for w [K, N], or None
    when no scaling (α 0) does best."""
    errors, scales = _scale_errors(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), group, np.dtype(scale_dtype))
    best = int(np.argmin(np.asarray(errors)))
    return None if best == 0 else (np.asarray(scales[best]), ALPHAS[best - 1])


@functools.partial(jax.jit, static_argnames=("group", "scale_dtype"))
def _best_shrink(w, x, group: int, scale_dtype):
    """[K / group, N]: the SHRINKS factor per (group, output) with the least output error of that group's
    inputs (their block of xᵀx)."""
    k, n = w.shape
    blocks = x.reshape(x.shape[0], k // group, group).transpose(1, 0, 2)
    gram = blocks.transpose(0, 2, 1) @ blocks  # [K / group, g, g]
    exact = w.reshape(k // group, group, n)

    def error(shrink):
        diff = exact - dequantize(*quantize_groups(w, group, scale_dtype, shrink)).reshape(k // group, group, n)
        return jnp.sum(diff * (gram @ diff), axis=1)

    errors = jax.lax.map(error, jnp.asarray(SHRINKS, jnp.float32))  # [shrinks, K / group, N]
    return jnp.asarray(SHRINKS, jnp.float32)[jnp.argmin(errors, axis=0)]


def clipped_int4(w: np.ndarray, x: np.ndarray, group: int, scale_dtype=np.float32):
    """w [K, N] → (q, scale, zero) as quantize_groups, each (group, output) range shrunk by the SHRINKS
    factor with the least output error on the rows x [R, K] of that group's inputs."""
    shrink = _best_shrink(jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32), group, np.dtype(scale_dtype))
    return quantize_groups(w, group, scale_dtype, np.asarray(shrink, np.float64))


def scale_model(params: dict, config, stats: dict, scale_dtype=np.float32) -> dict[tuple[str, ...], tuple[np.ndarray, float]]:
    """Fold AWQ's chosen scales into `params` (nested dicts of float32 numpy arrays, changed in place); stats:
    tools/convert/calibration.InputStats by weight path (their sample rows). Returns {path: (s, α)}."""
    from jaxllm.models.quant import group_size_for

    def choose(stat, w):
        return activation_scale(stat.sample, w, group_size_for(w.shape[0], config.weight_quant.group_size), scale_dtype)

    return fold_scales(params, config, stats, choose)
