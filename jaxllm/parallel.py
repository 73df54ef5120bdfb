"""The device mesh for `--tp` and the rules that map each weight's logical axes onto it."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig

TP_AXIS = "tp"
# How --tp places a MoE layer's experts: "split" (every device a slice of each expert's intermediate axis,
# partial outputs summed) or "per_device" (num_experts / tp whole experts on each device, each device computing
# the pairs routed to its experts, outputs summed). The choice is a deployment's, not LightLLM's: no flag, this
# environment variable (read once, at load: `with_expert_placement`).
EXPERT_PLACEMENTS = ("split", "per_device")
EXPERT_PLACEMENT_ENV = "JAXLLM_EXPERT_PLACEMENT"


def make_mesh(tp: int, devices=None) -> Mesh:
    """A 1-D mesh over the first `tp` devices."""
    devices = list(devices if devices is not None else jax.devices())
    if tp < 1 or tp > len(devices):
        raise ValueError(f"--tp {tp} needs {tp} devices; {len(devices)} available ({devices[0].platform})")
    return Mesh(np.array(devices[:tp]), (TP_AXIS,))


def logical_rules(config: ModelConfig, tp: int) -> tuple[tuple[str, str | None], ...]:
    """Logical axis → mesh axis. Query heads and the MLP are split across `tp`; KV heads too when they
    divide evenly, otherwise they are replicated (GQA with fewer KV heads than devices). Experts as
    `config.moe.placement` says (`expert_rules`); the router is replicated."""
    if config.num_heads % tp:
        raise ValueError(f"--tp {tp} must divide num_attention_heads ({config.num_heads})")
    if config.intermediate_size % tp:
        raise ValueError(f"--tp {tp} must divide intermediate_size ({config.intermediate_size})")
    placement = "split"
    if config.moe is not None:
        placement = config.moe.placement
        split = "num_experts" if placement == "per_device" else "intermediate_size"
        for name in (split, "shared_intermediate_size"):
            if getattr(config.moe, name) % tp:
                raise ValueError(f"--tp {tp} must divide the experts' {name} ({getattr(config.moe, name)}) "
                                 f"with the experts placed {placement!r} ({EXPERT_PLACEMENT_ENV})")
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
        *expert_rules(placement),
        ("router_experts", None),
        ("latent", None),
        ("labels", None),
        ("patch", None),
    )


def expert_rules(placement: str) -> tuple[tuple[str, str | None], ...]:
    """The experts' logical axes ("experts" [E], "expert_mlp" [F]) → mesh axis, for an EXPERT_PLACEMENTS value."""
    if placement not in EXPERT_PLACEMENTS:
        raise ValueError(f"expert placement {placement!r} is not one of {', '.join(EXPERT_PLACEMENTS)}")
    per_device = placement == "per_device"
    return ("experts", TP_AXIS if per_device else None), ("expert_mlp", None if per_device else TP_AXIS)


def expert_specs(placement: str) -> tuple[PartitionSpec, PartitionSpec]:
    """PartitionSpecs of the experts' gate_up [E, D, F, 2] and down [E, F, D] (`moe.MoE`'s declared axes)."""
    axis = dict(expert_rules(placement))
    return (PartitionSpec(axis["experts"], None, axis["expert_mlp"], None),
            PartitionSpec(axis["experts"], axis["expert_mlp"], None))


def with_expert_placement(config: ModelConfig, placement: str | None = None) -> ModelConfig:
    """`config` with its experts placed as `placement` says (default: $JAXLLM_EXPERT_PLACEMENT, else
    "split"); unchanged for a model without experts. ValueError for an unknown placement."""
    placement = placement or os.environ.get(EXPERT_PLACEMENT_ENV) or "split"
    expert_rules(placement)  # validates
    if config.moe is None:
        return config
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, placement=placement))


def kv_cache_spec(config: ModelConfig, tp: int) -> PartitionSpec:
    """KV buffers [slots, kv_heads, head_dim] are split by KV head, like the K/V projections; a latent
    cache (one row per token for all heads) is replicated."""
    if config.mla is not None:
        return PartitionSpec(None, None, None)
    kv_axis = dict(logical_rules(config, tp))["kv_heads"]
    return PartitionSpec(None, kv_axis, None)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
