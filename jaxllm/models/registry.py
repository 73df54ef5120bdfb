"""config.json's `model_type` → the family module serving it."""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models import (baichuan, bloom, cohere, deepseek, gemma, internlm2, llama, mixtral, phi3, qwen,
                           qwen_moe, stablelm, starcoder)
from jaxllm.models.family import Family

_FAMILIES = (llama.FAMILY, gemma.FAMILY, phi3.FAMILY, starcoder.STARCODER2, starcoder.GPT_BIGCODE, stablelm.FAMILY,
             cohere.FAMILY, bloom.FAMILY, internlm2.FAMILY, baichuan.FAMILY, qwen.FAMILY, mixtral.FAMILY,
             qwen_moe.FAMILY, deepseek.FAMILY)
FAMILIES: dict[str, Family] = {t: f for f in _FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def family_of(model_type: str) -> Family:
    """The family serving `model_type`; ValueError lists the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; jaxllm serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    family = family_of(raw.get("model_type", "llama"))
    return family.config(with_hf_defaults(raw))


def with_hf_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` completed with the defaults of transformers' config class for its model_type (per-layer
    types, activation names, rope parameters...), for the model types transformers knows."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type", "llama")
    if model_type not in CONFIG_MAPPING:
        return raw
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    return {**raw, **CONFIG_MAPPING[model_type](**fields).to_dict()}
