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

import numpy as np

from tools.convert.int4 import dequantize, quantize_groups
from tools.convert.scaling import fold_scales

ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 11))
SHRINKS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 … 0.5


def _rtn_output_error(x: np.ndarray, w: np.ndarray, s: np.ndarray | None, group: int, scale_dtype) -> float:
    ws = w if s is None else w * s[:, None]
    xs = x if s is None else x / s
    return float(np.linalg.norm(x @ w - xs @ dequantize(*quantize_groups(ws, group, scale_dtype))))


def activation_scale(x: np.ndarray, w: np.ndarray, group: int, scale_dtype=np.float32):
    """(s [K], α) with the least int4 output error on the calibration rows x [R, K] for w [K, N], or None
    when no scaling does best."""
    x = x.astype(np.float32)
    w = w.astype(np.float32)
    mean_abs = np.maximum(np.abs(x).mean(axis=0), 1e-5)
    best, best_err = None, _rtn_output_error(x, w, None, group, scale_dtype)
    for alpha in ALPHAS:
        s = mean_abs.astype(np.float64) ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = _rtn_output_error(x, w, s, group, scale_dtype)
        if err < best_err:
            best, best_err = (s, alpha), err
    return best


def clipped_int4(w: np.ndarray, x: np.ndarray, group: int, scale_dtype=np.float32):
    """w [K, N] → (q, scale, zero) as quantize_groups, each (group, output) range shrunk by the SHRINKS
    factor with the least output error on the rows x [R, K] of that group's inputs."""
    k, n = w.shape
    blocks = x.astype(np.float64).reshape(x.shape[0], k // group, group)
    gram = np.einsum("rbi,rbj->bij", blocks, blocks)  # [K / group, g, g]
    exact = w.astype(np.float64).reshape(k // group, group, n)
    best_err = np.full((k // group, n), np.inf)
    best_shrink = np.ones((k // group, n))
    for shrink in SHRINKS:
        diff = exact - dequantize(*quantize_groups(w, group, scale_dtype, shrink)).reshape(k // group, group, n)
        err = np.einsum("bin,bij,bjn->bn", diff, gram, diff)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_shrink = np.where(better, shrink, best_shrink)
    return quantize_groups(w, group, scale_dtype, best_shrink)


def scale_model(params: dict, config, stats: dict, scale_dtype=np.float32) -> dict[tuple[str, ...], tuple[np.ndarray, float]]:
    """Fold AWQ's chosen scales into `params` (nested dicts of float32 numpy arrays, changed in place); stats:
    tools/convert/calibration.InputStats by weight path (their sample rows). Returns {path: (s, α)}."""
    from jaxllm.models.quant import group_size_for

    def choose(stat, w):
        return activation_scale(stat.sample, w, group_size_for(w.shape[0], config.weight_quant.group_size), scale_dtype)

    return fold_scales(params, config, stats, choose)
