"""config.json's `model_type` → the family module serving it."""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.models import deepseek, llama, mixtral, qwen_moe
from jaxllm.models.family import Family

_MODULES = (llama, mixtral, qwen_moe, deepseek)
FAMILIES: dict[str, Family] = {t: m.FAMILY for m in _MODULES for t in m.FAMILY.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def family_of(model_type: str) -> Family:
    """The family serving `model_type`; ValueError lists the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; jaxllm serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    return family_of(raw.get("model_type", "llama")).config(raw)
