"""Per-input-channel scales folded into a model's weights, shared by SmoothQuant (w8a8) and AWQ (w4a16): for a
product x @ w whose input comes out of an op that can absorb a per-input factor, input j is divided by s_j in
that op and row j of w multiplied by s_j, so the 16-bit model is unchanged while the quantised weight (and,
for w8a8, the activation) sees rescaled channels.

The ops that absorb s: the RMSNorm / LayerNorm before `qkv_proj` and before the MLP (pre-norm blocks: the
norm feeds that one product), and, for the MLP down-projection of a gated MLP, the up half of `gate_up_proj`
(h = act(gate) * up is linear in up). `o_proj`'s input (the attention output) is left alone.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def fold_scales(params: dict, config, stats: dict, choose: Callable) -> dict[tuple[str, ...], tuple[np.ndarray, object]]:
    """For every product that can absorb a scale, `choose(stats[path], w [K, N] float)` → (s [K], tag) or None
    (no scaling); the chosen s is folded into `params` (nested dicts of float32 numpy arrays, changed in
    place). Returns {path: (s, tag)} of the scaled products."""
    chosen = {}
    for layer in range(config.num_layers):
        block = params[f"layers_{layer}"]
        targets = []
        if config.norm_layout == "pre":
            targets += [(("self_attn", "qkv_proj"), "input_layernorm"), (("mlp", "gate_up_proj"), "post_attention_layernorm")]
        if config.mlp_gated:
            targets.append((("mlp", "down_proj"), None))
        for (module, name), norm in targets:
            path = (f"layers_{layer}", module, name)
            if path not in stats:
                continue
            w = block[module][name]
            flat = w.reshape(w.shape[0], -1)
            picked = choose(stats[path], flat)
            if picked is None:
                continue
            s = picked[0]
            block[module][name] = (flat * s[:, None]).reshape(w.shape)
            if norm is not None:
                _divide_norm(block[norm], s, config.norm_plus_one)
            else:  # down_proj: the up half of gate_up (its output columns) and its bias
                block["mlp"]["gate_up_proj"][:, 1, :] /= s
                if "gate_up_bias" in block["mlp"]:
                    block["mlp"]["gate_up_bias"][1, :] /= s
            chosen[path] = picked
    return chosen


def _divide_norm(norm: dict, s: np.ndarray, plus_one: bool) -> None:
    """The norm's output divided by s: its weight (stored as w - 1 when `plus_one`) and bias."""
    if plus_one:
        norm["weight"] = (1.0 + norm["weight"]) / s - 1.0
    else:
        norm["weight"] = norm["weight"] / s
    if "bias" in norm:
        norm["bias"] = norm["bias"] / s
