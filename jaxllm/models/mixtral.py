"""Mixtral: Mistral's attention blocks with every MLP a mixture of experts (softmax router, top-k weights
renormalised, no shared expert)."""

from __future__ import annotations

from jaxllm.config import ModelConfig, Moe, common_fields
from jaxllm.models import hf_map, moe_weights
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    fields["moe"] = Moe(
        num_experts=raw["num_local_experts"],
        top_k=raw["num_experts_per_tok"],
        intermediate_size=raw["intermediate_size"],
        layers=tuple(range(fields["num_layers"])),
    )
    return ModelConfig(**fields)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    return moe_weights.llama_blocks(config, lambda i, hf: {
        **hf_map.router(hf + "block_sparse_moe.gate", hf_map.layer_path(i, "mlp")),
        **hf_map.experts(config, hf + "block_sparse_moe.experts.", "w1", "w3", "w2", hf_map.layer_path(i, "mlp")),
    })


FAMILY = Family(model_types=("mixtral",), config=config, weights=weights)
