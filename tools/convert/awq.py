"""AWQ (Lin et al., 2023) for jaxllm's w4a16: activation-aware per-input-channel scales, then a clipping
search per int4 group and a least-squares fit of each group's scale, all chosen by the product's output error
on the calibration rows.

Scaling: the inputs that carry large activations matter most to the output, so their weight rows are scaled
up (s_j = mean|x_j|^α, normalised) before int4 rounding and the input divided by s_j in the op before
(tools/convert/scaling.py: the RMSNorms before `qkv_proj` and the MLP, the up half of `gate_up_proj` for
`down_proj`, v's columns of `qkv_proj` for `o_proj`, decided first so that `qkv_proj`'s search sees the folded
v); α per product from a grid (0: no scaling) by ‖x w - (x / s) Q(w s)‖ on the calibration rows. `o_proj`'s
inputs that share one v channel (the query heads of a KV head) share one scale, from their mean |x| together.

Clipping: each (group, output) range [min, max] shrunk by the factor, from a grid, with the least output
error of that group's inputs (the group's block of the inputs' Gram matrix), trading clipped outliers for
finer steps where the activations say it pays.

Scale fit: a shrink factor only picks among ranges of one family; for the integer levels it gives, the scale
with the least output error of the group's inputs has a closed form (levels and zero point fixed), so each
(group, output)'s scale is moved there and its levels re-rounded, a few rounds, each kept only where it lowers
that error. The stored layout is unchanged (integer zero point, scale rounded to its stored dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tools.convert.int4 import dequantize, quantize_groups
from tools.convert.scaling import fold_scales

ALPHAS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 … 1.0 (steps of 0.1: +0.1 point on SmolLM2)
SHRINKS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 … 0.5
FIT_ROUNDS = 4  # scale fit / re-round rounds after the clipping search (SmolLM2: docs/perf.md)


@functools.partial(jax.jit, static_argnames=("group", "scale_dtype"))
def _scale_errors(x, w, mean_abs, group: int, scale_dtype):
    """‖x w - (x / s) Q(w s)‖² for no scaling and each α of ALPHAS (s = mean_abs^α normalised), with
    (x / s) Q(w s) = x (Q(w s) / s) measured through the Gram matrix xᵀx."""
    gram = x.T @ x
    mean_abs = jnp.maximum(mean_abs, 1e-5)

    def error(alpha):
        s = mean_abs**alpha
        s = s / jnp.sqrt(s.max() * s.min())
        diff = w - dequantize(*quantize_groups(w * s[:, None], group, scale_dtype)) / s[:, None]
        return jnp.sum(diff * (gram @ diff)), s

    return jax.lax.map(error, jnp.asarray((0.0,) + ALPHAS, jnp.float32))


def activation_scale(x: np.ndarray, w: np.ndarray, group: int, scale_dtype=np.float32, tie: np.ndarray | None = None):
    """(s [K], α) with the least int4 output error on the calibration rows x [R, K] for w [K, N], or None
    when no scaling (α 0) does best. tie [K] (optional): inputs with one tie id get one scale, from their
    mean |x| together."""
    mean_abs = np.abs(x).mean(axis=0, dtype=np.float64)
    if tie is not None:
        mean_abs = (np.bincount(tie, mean_abs) / np.bincount(tie))[tie]
    errors, scales = _scale_errors(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                   jnp.asarray(mean_abs, jnp.float32), group, np.dtype(scale_dtype))
    best = int(np.argmin(np.asarray(errors)))
    return None if best == 0 else (np.asarray(scales[best]), ALPHAS[best - 1])


def _group_grams(x, group: int):
    """[K / group, g, g]: each group's block of xᵀx for the rows x [R, K]."""
    blocks = x.reshape(x.shape[0], x.shape[1] // group, group).transpose(1, 0, 2)
    return blocks.transpose(0, 2, 1) @ blocks


def _group_errors(exact, approx, gram):
    """[K / group, N]: each (group, output)'s output error ‖x_g (w - ŵ)‖² through its block of the Gram
    matrix; exact and approx [K / group, g, N]."""
    diff = exact - approx
    return jnp.sum(diff * (gram @ diff), axis=1)


@functools.partial(jax.jit, static_argnames=("group", "scale_dtype"))
def _best_shrink(w, x, group: int, scale_dtype):
    """[K / group, N]: the SHRINKS factor per (group, output) with the least output error of that group's
    inputs (their block of xᵀx)."""
    k, n = w.shape
    gram = _group_grams(x, group)
    exact = w.reshape(k // group, group, n)

    def error(shrink):
        approx = dequantize(*quantize_groups(w, group, scale_dtype, shrink)).reshape(k // group, group, n)
        return _group_errors(exact, approx, gram)

    errors = jax.lax.map(error, jnp.asarray(SHRINKS, jnp.float32))  # [shrinks, K / group, N]
    return jnp.asarray(SHRINKS, jnp.float32)[jnp.argmin(errors, axis=0)]


@functools.partial(jax.jit, static_argnames=("group", "scale_dtype", "rounds"))
def fitted_scales(w, x, q, scale, zero, group: int, scale_dtype, rounds: int = FIT_ROUNDS):
    """(q, scale) for w [K, N] quantised as (q, scale, zero) [K / group, N]: each (group, output)'s scale
    moved to the least-squares optimum of its inputs' output error for its levels q - zero (zero kept),
    rounded to `scale_dtype`, q re-rounded to it; each round kept only where it lowers that error."""
    k, n = w.shape
    gram = _group_grams(x, group)
    exact = w.reshape(k // group, group, n)
    zero = zero[:, None]

    def levels(q):
        return q.reshape(k // group, group, n) - zero

    def step(carry, _):
        q, scale, err = carry
        d = levels(q)
        num = jnp.sum(d * (gram @ exact), axis=1)
        den = jnp.sum(d * (gram @ d), axis=1)
        fitted = jnp.where((den > 0) & (num > 0), num / jnp.where(den > 0, den, 1.0), scale)
        fitted = fitted.astype(scale_dtype).astype(scale.dtype)
        requant = jnp.clip(jnp.round(exact / fitted[:, None]) + zero, 0, 15).reshape(k, n)
        new_err = _group_errors(exact, levels(requant) * fitted[:, None], gram)
        better = new_err < err
        return (jnp.where(jnp.repeat(better, group, 0), requant, q), jnp.where(better, fitted, scale),
                jnp.minimum(new_err, err)), None

    q = q.astype(w.dtype)
    start = _group_errors(exact, levels(q) * scale[:, None], gram)
    (q, scale, _), _ = jax.lax.scan(step, (q, scale, start), None, length=rounds)
    return q.astype(jnp.int32), scale


def clipped_int4(w: np.ndarray, x: np.ndarray, group: int, scale_dtype=np.float32, fit_rounds: int = FIT_ROUNDS):
    """w [K, N] → (q, scale, zero) as quantize_groups, each (group, output) range shrunk by the SHRINKS
    factor with the least output error on the rows x [R, K] of that group's inputs, then its scale fitted
    to them (fitted_scales, `fit_rounds` rounds; 0: the clipping search alone)."""
    wj, xj = jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)
    shrink = _best_shrink(wj, xj, group, np.dtype(scale_dtype))
    q, scale, zero = quantize_groups(w, group, scale_dtype, np.asarray(shrink, np.float64))
    if fit_rounds:
        as_f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
        q, scale = fitted_scales(wj, xj, jnp.asarray(q), as_f32(scale), as_f32(zero), group, np.dtype(scale_dtype),
                                 fit_rounds)
        q, scale = np.asarray(q), np.asarray(scale, np.float64)
    return q, scale, zero


def scale_model(params: dict, config, stats: dict, scale_dtype=np.float32) -> dict[tuple[str, ...], tuple[np.ndarray, float]]:
    """Fold AWQ's chosen scales into `params` (nested dicts of float32 numpy arrays, changed in place); stats:
    tools/convert/calibration.InputStats by weight path (their sample rows). Returns {path: (s, α)}."""
    from jaxllm.models.quant import group_size_for

    def choose(stat, w, tie=None):
        group = group_size_for(w.shape[0], config.weight_quant.group_size)
        return activation_scale(stat.sample, w, group, scale_dtype, tie)

    return fold_scales(params, config, stats, choose, through_v=True)
