"""SmoothQuant (Xiao et al., 2022) for jaxllm's w8a8: activation outliers moved into the weights before both
are quantised, by per-input-channel scales folded into the op before each product (tools/convert/scaling.py):
per-token int8 activations lose less to a few large channels. s_j = max|x_j|^α / max|w_j|^(1-α), with α per
product picked on the calibration rows (including no smoothing) by the int8 × int8 output error.
"""

from __future__ import annotations

import numpy as np

from tools.convert.scaling import fold_scales

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _int8_rows(a: np.ndarray) -> np.ndarray:
    """a quantised per row (absmax / 127, round to nearest) and dequantised, as jaxllm's w8a8 does at run time."""
    scale = np.abs(a).max(axis=1, keepdims=True) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(a / safe), -127, 127) * scale


def w8a8_error(x: np.ndarray, w: np.ndarray, s: np.ndarray | None) -> float:
    """‖x @ w - (w8a8 product with smoothing s)‖ on rows x [R, K], w [K, N] (s None: no smoothing)."""
    xs, ws = (x, w) if s is None else (x / s, w * s[:, None])
    out = _int8_rows(xs) @ _int8_rows(ws.T).T
    return float(np.linalg.norm(out - x @ w))


def smoothing(x_absmax: np.ndarray, w: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray | None, float | None]:
    """(s [K] or None for none, its α) with the least w8a8 output error on the calibration `sample` rows."""
    w_absmax = np.abs(w).max(axis=1)
    best, best_err = (None, None), w8a8_error(sample, w, None)
    for alpha in ALPHAS:
        s = np.maximum(x_absmax, 1e-5) ** alpha / np.maximum(w_absmax, 1e-5) ** (1 - alpha)
        s = np.where((x_absmax > 0) & (w_absmax > 0), s, 1.0)
        err = w8a8_error(sample, w, s)
        if err < best_err:
            best, best_err = (s, alpha), err
    return best


def smooth(params: dict, config, stats: dict) -> dict[tuple[str, ...], float]:
    """Fold the chosen factors into `params` (nested dicts of float32 numpy arrays, changed in place); stats:
    tools/convert/calibration.InputStats by weight path. Returns the α chosen per smoothed weight path."""

    def choose(stat, w):
        s, alpha = smoothing(stat.absmax.astype(np.float64), w, stat.sample)
        return None if s is None else (s, alpha)

    return {path: alpha for path, (_, alpha) in fold_scales(params, config, stats, choose).items()}
