"""Building blocks of the families' Hugging Face weight maps: where each HF tensor goes in our param tree.

Our layouts: q/k/v fill one `qkv_proj` [D, kv_heads, group + 2, head_dim] (each KV head's query heads, then
its key and value), gate/up one `gate_up_proj` [D, 2, F], `o_proj` [heads, head_dim, D], other matrices
[in, out]. A family's map is `{hf_name: Target}`; `jaxllm/weights.py` applies it to any weight source.
A transform runs on the devices, inside a jitted function (`jaxllm/weight_transfer.py`), or on the host for a
small tensor: array methods, or the functions of the array's own module (`array_module`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: our param `path`, `transform` to our layout, and for a fused param the
    index of its part (`part`) among `parts` parts."""

    path: Path
    transform: Callable[[jnp.ndarray], jnp.ndarray]
    part: Any = None
    parts: int = 1


WeightMap = dict[str, Target]


def same(w):
    return w


def transposed(w):
    return w.T


def layer_path(i: int, *names: str) -> Path:
    return (f"layers_{i}", *names)


def norm_targets(hf: str, path: Path, config: ModelConfig) -> WeightMap:
    """A norm's weight (and bias for LayerNorm with one)."""
    table = {hf + ".weight": Target(path + ("weight",), same)}
    if config.norm_bias:
        table[hf + ".bias"] = Target(path + ("bias",), same)
    return table


def separate_qkv(config: ModelConfig, q: str, k: str, v: str, path: Path, bias: bool) -> WeightMap:
    """q/k/v as three HF linears (`q`, `k`, `v` are their names without ".weight") into `qkv_proj`."""
    kv, g, d = config.num_kv_heads, config.group_size, config.head_dim
    q_in = lambda w: w.T.reshape(w.shape[1], kv, g, d)  # noqa: E731  [h*d, D] → [D, kv, g, d]
    kv_in = lambda w: w.T.reshape(w.shape[1], kv, d)  # noqa: E731  [kv*d, D] → [D, kv, d]
    part = lambda j: (slice(None), slice(None), j)  # noqa: E731  index into [D, kv, g + 2, d]
    table = {
        q + ".weight": Target(path + ("qkv_proj",), q_in, part(slice(0, g)), 3),
        k + ".weight": Target(path + ("qkv_proj",), kv_in, part(g), 3),
        v + ".weight": Target(path + ("qkv_proj",), kv_in, part(g + 1), 3),
    }
    if bias:
        bias_part = lambda j: (slice(None), j)  # noqa: E731  index into [kv, g + 2, d]
        table.update({
            q + ".bias": Target(path + ("qkv_bias",), lambda b: b.reshape(kv, g, d), bias_part(slice(0, g)), 3),
            k + ".bias": Target(path + ("qkv_bias",), lambda b: b.reshape(kv, d), bias_part(g), 3),
            v + ".bias": Target(path + ("qkv_bias",), lambda b: b.reshape(kv, d), bias_part(g + 1), 3),
        })
    return table


def array_module(w):
    """numpy for a host array, jax.numpy for a device (or traced) one."""
    return np if isinstance(w, np.ndarray) else jnp


def grouped_from_concat(config: ModelConfig, w: jnp.ndarray) -> jnp.ndarray:
    """[q; k; v] stacked on the first axis ([(h + 2 kv) * d, ...]) → grouped per KV head [..., kv, g + 2, d]
    (the trailing axes of `w` move to the front: a [rows, D] matrix gives [D, kv, g + 2, d])."""
    kv, g, d = config.num_kv_heads, config.group_size, config.head_dim
    rest = w.shape[1:]
    q = w[: kv * g * d].reshape(kv, g, d, *rest)
    k = w[kv * g * d : (kv * g + kv) * d].reshape(kv, 1, d, *rest)
    v = w[(kv * g + kv) * d :].reshape(kv, 1, d, *rest)
    xp = array_module(w)
    grouped = xp.concatenate([q, k, v], axis=1)  # [kv, g + 2, d, *rest]
    return xp.moveaxis(grouped, [0, 1, 2], [len(rest), len(rest) + 1, len(rest) + 2])


def concat_qkv(config: ModelConfig, name: str, path: Path, bias: bool) -> WeightMap:
    """q/k/v as one HF linear with rows [q; k; v] (Phi-3, StarCoder's MQA, Baichuan, Qwen-1)."""
    table = {name + ".weight": Target(path + ("qkv_proj",), lambda w: grouped_from_concat(config, w))}
    if bias:
        table[name + ".bias"] = Target(path + ("qkv_bias",), lambda b: grouped_from_concat(config, b))
    return table


def out_proj(config: ModelConfig, name: str, path: Path, bias: bool) -> WeightMap:
    h, d = config.num_heads, config.head_dim
    table = {name + ".weight": Target(path + ("o_proj",), lambda w: w.T.reshape(h, d, w.shape[0]))}
    if bias:
        table[name + ".bias"] = Target(path + ("o_bias",), same)
    return table


def gated_mlp(config: ModelConfig, gate: str, up: str, down: str, path: Path) -> WeightMap:
    """Gate and up as two HF linears into `gate_up_proj`; `down` into `down_proj`."""
    table = {
        gate + ".weight": Target(path + ("gate_up_proj",), transposed, (slice(None), 0), 2),
        up + ".weight": Target(path + ("gate_up_proj",), transposed, (slice(None), 1), 2),
        down + ".weight": Target(path + ("down_proj",), transposed),
    }
    if config.mlp_bias:
        table.update({
            gate + ".bias": Target(path + ("gate_up_bias",), same, 0, 2),
            up + ".bias": Target(path + ("gate_up_bias",), same, 1, 2),
            down + ".bias": Target(path + ("down_bias",), same),
        })
    return table


def plain_mlp(config: ModelConfig, up: str, down: str, path: Path) -> WeightMap:
    table = {
        up + ".weight": Target(path + ("up_proj",), transposed),
        down + ".weight": Target(path + ("down_proj",), transposed),
    }
    if config.mlp_bias:
        table.update({up + ".bias": Target(path + ("up_bias",), same), down + ".bias": Target(path + ("down_bias",), same)})
    return table


def embeddings_and_head(config: ModelConfig, embed: str, norm: str, head: str = "lm_head") -> WeightMap:
    """The embedding, the final norm and the head: the LM head `head` (unless tied to the embedding), or the
    config's score head (`score` [hidden, labels])."""
    table = {embed + ".weight": Target(("embed_tokens",), same), **norm_targets(norm, ("norm",), config)}
    if config.score_head is not None:
        table[config.score_head.hf_name + ".weight"] = Target(("score",), transposed)
    elif not config.tie_word_embeddings:
        table[head + ".weight"] = Target(("lm_head",), transposed)
    return table


def experts(config: ModelConfig, prefix: str, gate: str, up: str, down: str, path: Path) -> WeightMap:
    """Per-expert HF linears `{prefix}{j}.{gate|up|down}.weight` into `experts_gate_up_proj` [E, D, F, 2]
    (gate at 0, up at 1 of the last axis) and `experts_down_proj` [E, F, D]."""
    count = config.moe.num_experts
    table = {}
    for j in range(count):
        table[f"{prefix}{j}.{gate}.weight"] = Target(path + ("experts_gate_up_proj",), transposed, (j, ..., 0), 2 * count)
        table[f"{prefix}{j}.{up}.weight"] = Target(path + ("experts_gate_up_proj",), transposed, (j, ..., 1), 2 * count)
        table[f"{prefix}{j}.{down}.weight"] = Target(path + ("experts_down_proj",), transposed, j, count)
    return table


def router(name: str, path: Path) -> WeightMap:
    """The router's HF linear [E, D] → `router` [D, E]."""
    return {name + ".weight": Target(path + ("router",), transposed)}
