"""The device mesh for `--tp` and the rules that map each weight's logical axes onto it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig

TP_AXIS = "tp"


def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh over the first `tp` devices."""
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or tp > len(devices):
        raise ValueError(f"--tp {tp} needs {tp} devices; {len(devices)} available ({devices[0].platform})")
    return Mesh(np.array(devices[:tp]), (TP_AXIS,))


def logical_rules(config: ModelConfig, tp: int) -> tuple[tuple[str, str | None], ...]:
    """Logical axis → mesh axis. Query heads and the MLP are split across `tp`; KV heads too when they
    divide evenly, otherwise they are replicated (GQA with fewer KV heads than devices). Experts: every device
    holds a slice of each expert's intermediate dimension ("expert_mlp"); the experts axis and the router
    are replicated."""
    if config.num_heads % tp:
        raise ValueError(f"--tp {tp} must divide num_attention_heads ({config.num_heads})")
    if config.intermediate_size % tp:
        raise ValueError(f"--tp {tp} must divide intermediate_size ({config.intermediate_size})")
    if config.moe is not None:
        for name in ("intermediate_size", "shared_intermediate_size"):
            if getattr(config.moe, name) % tp:
                raise ValueError(f"--tp {tp} must divide the experts' {name} ({getattr(config.moe, name)})")
    if config.vision is not None:
        config.vision.check_tp(tp)
    split_kv = config.num_kv_heads % tp == 0
    split_vocab = config.vocab_size % tp == 0
    return (
        ("heads", TP_AXIS),
        ("kv_heads", TP_AXIS if split_kv else None),
        ("mlp", TP_AXIS),
        ("vocab", TP_AXIS if split_vocab else None),
        ("embed", None),
        ("head_dim", None),
        ("qkv", None),
        ("stack", None),
        ("norm", None),
        ("positions", None),
        ("experts", None),
        ("expert_mlp", TP_AXIS),
        ("latent", None),
        ("labels", None),
        ("patch", None),
    )


def kv_cache_spec(config: ModelConfig, tp: int) -> PartitionSpec:
    """KV buffers [slots, kv_heads, head_dim] are split by KV head, like the K/V projections; a latent
    cache (one row per token for all heads) is replicated."""
    if config.mla is not None:
        return PartitionSpec(None, None, None)
    kv_axis = dict(logical_rules(config, tp))["kv_heads"]
    return PartitionSpec(None, kv_axis, None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
