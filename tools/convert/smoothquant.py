"""SmoothQuant (Xiao et al., 2022) for jaxllm's w8a8: activation outliers moved into the weights before both
are quantised. For a product x @ w whose input x comes out of an op that can absorb a per-input factor, each
input j is divided by s_j in that op and row j of w multiplied by s_j: the 16-bit product is unchanged, while
per-token int8 activations lose less to a few large channels. s_j = max|x_j|^α / max|w_j|^(1-α), with α per
product picked on the calibration rows (including no smoothing) by the int8 × int8 output error.

The ops that absorb s: the RMSNorm / LayerNorm before `qkv_proj` and before the MLP (pre-norm blocks: the
norm feeds that one product), and, for the MLP down-projection of a gated MLP, the up half of `gate_up_proj`
(h = act(gate) * up is linear in up). `o_proj`'s input (the attention output) is left alone.
"""

from __future__ import annotations

import numpy as np

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
    chosen = {}
    for layer in range(config.num_layers):
        block = params[f"layers_{layer}"]
        prefix = (f"layers_{layer}",)
        targets = []
        if config.norm_layout == "pre":
            targets += [(("self_attn", "qkv_proj"), "input_layernorm"), (("mlp", "gate_up_proj"), "post_attention_layernorm")]
        if config.mlp_gated:
            targets.append((("mlp", "down_proj"), None))
        for (module, name), norm in targets:
            path = prefix + (module, name)
            if path not in stats:
                continue
            w = block[module][name]
            flat = w.reshape(w.shape[0], -1)
            s, alpha = smoothing(stats[path].absmax.astype(np.float64), flat, stats[path].sample)
            if s is None:
                continue
            block[module][name] = (flat * s[:, None]).reshape(w.shape)
            if norm is not None:
                _divide_norm(block[norm], s, config.norm_plus_one)
            else:  # down_proj: the up half of gate_up (its output columns) and its bias
                block["mlp"]["gate_up_proj"][:, 1, :] /= s
                if "gate_up_bias" in block["mlp"]:
                    block["mlp"]["gate_up_bias"][1, :] /= s
            chosen[path] = alpha
    return chosen


def _divide_norm(norm: dict, s: np.ndarray, plus_one: bool) -> None:
    """The norm's output divided by s: its weight (stored as w - 1 when `plus_one`) and bias."""
    if plus_one:
        norm["weight"] = (1.0 + norm["weight"]) / s - 1.0
    else:
        norm["weight"] = norm["weight"] / s
    if "bias" in norm:
        norm["bias"] = norm["bias"] / s
