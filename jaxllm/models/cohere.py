"""Cohere Command-R: LayerNorm without bias, one norm feeding parallel attention and MLP, interleaved
rotary pairs, optional per-head q/k LayerNorms, logits scaled by `logit_scale`, tied head."""

from __future__ import annotations

import dataclasses

from jaxllm.config import ModelConfig, common_fields
from jaxllm.models import llama
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    fields.update(
        norm="layer", norm_eps=raw["layer_norm_eps"], norm_layout="parallel",
        rope=dataclasses.replace(fields["rope"], interleaved=True), logit_scale=float(raw["logit_scale"]),
    )
    if raw.get("use_qk_norm"):
        fields.update(qk_norm="head", qk_norm_per_head_weights=True)
    return ModelConfig(**fields)


FAMILY = Family(model_types=("cohere",), config=config, weights=llama.weights)
