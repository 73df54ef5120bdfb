"""Per-input-channel scales folded into a model's weights, shared by SmoothQuant (w8a8) and AWQ (w4a16): for a
product x @ w whose input comes out of an op that can absorb a per-input factor, input j is divided by s_j in
that op and row j of w multiplied by s_j, so the 16-bit model is unchanged while the quantised weight (and,
for w8a8, the activation) sees rescaled channels.

The ops that absorb s: the RMSNorm / LayerNorm before `qkv_proj` and before the MLP (pre-norm blocks: the
norm feeds that one product), and, for the MLP down-projection of a gated MLP, the up half of `gate_up_proj`
(h = act(gate) * up is linear in up). With `through_v`, `o_proj`'s input too: the attention output of a query
head is a softmax-weighted sum of its KV head's v rows, so channel c of every query head in one KV group is
divided by s when v's output channel c is; the scale is therefore one per (KV head, channel), shared by that
group's query heads, and folded into v's columns of `qkv_proj` (and its bias).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def fold_scales(params: dict, config, stats: dict, choose: Callable,
                through_v: bool = False) -> dict[tuple[str, ...], tuple[np.ndarray, object]]:
    """For every product that can absorb a scale, `choose(stats[path], w [K, N] float)` → (s [K], tag) or None
    (no scaling); the chosen s is folded into `params` (nested dicts of float32 numpy arrays, changed in
    place). With `through_v`, `o_proj` first (its s then changes v before `qkv_proj`'s s is chosen), through
    `choose(stats[path], w, tie)`: tie [K] names each input's shared scale, and s must be equal within one.
    Returns {path: (s, tag)} of the scaled products (s over the flattened inputs)."""
    chosen = {}
    for layer in range(config.num_layers):
        block = params[f"layers_{layer}"]
        path = (f"layers_{layer}", "self_attn", "o_proj")
        if through_v and path in stats and _v_feeds_o(block, config):
            picked = _fold_through_v(block["self_attn"], config, stats[path], choose)
            if picked is not None:
                chosen[path] = picked
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


def _v_feeds_o(block: dict, config) -> bool:
    """Whether `block` is jaxllm's fused attention: qkv_proj [hidden, kv_heads, group + 2, head_dim] (v last)
    and o_proj [heads, head_dim, hidden]."""
    attn = block.get("self_attn", {})
    kv, d = config.num_kv_heads, config.head_dim
    return (getattr(attn.get("qkv_proj"), "shape", None) == (config.hidden_size, kv, config.group_size + 2, d)
            and getattr(attn.get("o_proj"), "shape", None) == (config.num_heads, d, config.hidden_size))


def _fold_through_v(attn: dict, config, stat, choose: Callable):
    """`o_proj`'s chosen scale (one per KV head and channel) folded into it and into v's columns of
    `qkv_proj` (and `qkv_bias`); returns choose's (s [heads * head_dim], tag) or None."""
    heads, d, group = config.num_heads, config.head_dim, config.group_size
    wo = attn["o_proj"]
    tie = (np.arange(heads)[:, None] // group * d + np.arange(d)).ravel()  # input (h, c) → (kv head of h, c)
    picked = choose(stat, wo.reshape(heads * d, -1), tie)
    if picked is None:
        return None
    s = picked[0].reshape(heads, d)
    attn["o_proj"] = wo * s[:, :, None]
    v = s[::group]  # [kv_heads, head_dim]: the first query head of each group (the rest share it)
    attn["qkv_proj"][:, :, group + 1, :] /= v
    if "qkv_bias" in attn:
        attn["qkv_bias"][:, group + 1, :] /= v
    return picked
