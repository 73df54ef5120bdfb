"""StableLM (2): LayerNorm with biases, partial rotary, optional q/k/v biases, optional per-head q/k
LayerNorms (one weight per head) and parallel attention + MLP blocks."""

from __future__ import annotations

import dataclasses

from jaxllm.config import ModelConfig, common_fields
from jaxllm.models import hf_map, llama
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    fields.update(
        norm="layer", norm_bias=True, norm_eps=raw["layer_norm_eps"], qkv_bias=bool(raw.get("use_qkv_bias")),
        o_bias=False, norm_layout="parallel" if raw.get("use_parallel_residual") else "pre",
    )
    if raw.get("qk_layernorm"):
        fields.update(qk_norm="head", qk_norm_per_head_weights=True)
    return ModelConfig(**fields)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    plain = config.qk_norm is None
    table = llama.weights(config if plain else dataclasses.replace(config, qk_norm=None))
    if not plain:
        heads = {"q": config.num_heads, "k": config.num_kv_heads}
        for i in range(config.num_layers):
            for x, count in heads.items():
                for h in range(count):  # one LayerNorm (no bias) per head → row h of our [heads, head_dim]
                    table[f"model.layers.{i}.self_attn.{x}_layernorm.norms.{h}.weight"] = hf_map.Target(
                        hf_map.layer_path(i, "self_attn", f"{x}_norm", "weight"), hf_map.same, h, count)
    return table


FAMILY = Family(model_types=("stablelm",), config=config, weights=weights)
