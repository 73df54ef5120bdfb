"""config.json's `model_type` → the family module serving it."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.config import ModelConfig, ScoreHead
from jaxllm.models import (baichuan, bloom, cohere, deepseek, gemma, internlm2, llama, llava, mixtral, phi3,
                           qwen, qwen2_vl, qwen_moe, stablelm, starcoder)
from jaxllm.models.family import Family

_FAMILIES = (llama.FAMILY, gemma.FAMILY, phi3.FAMILY, starcoder.STARCODER2, starcoder.GPT_BIGCODE, stablelm.FAMILY,
             cohere.FAMILY, bloom.FAMILY, internlm2.FAMILY, baichuan.FAMILY, qwen.FAMILY, mixtral.FAMILY,
             qwen_moe.FAMILY, deepseek.FAMILY, llava.FAMILY, qwen2_vl.FAMILY)
FAMILIES: dict[str, Family] = {t: f for f in _FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
# config.json `architectures` served with a score head instead of the LM head (reward models) → (the
# model_type it goes with, the head's tensor name); `*ForSequenceClassification` heads have `num_labels`
# outputs, InternLM2's `v_head` one.
SCORE_ARCHITECTURES = {
    "LlamaForSequenceClassification": ("llama", "score"),
    "MistralForSequenceClassification": ("mistral", "score"),
    "Qwen2ForSequenceClassification": ("qwen2", "score"),
    "InternLM2ForRewardModel": ("internlm2", "v_head"),
}


def reward_architecture(model_type: str) -> str:
    """The reward-model architecture served for `model_type` (ValueError if none is)."""
    for arch, (kind, _) in SCORE_ARCHITECTURES.items():
        if kind == model_type:
            return arch
    raise ValueError(f"no reward model is served for model_type {model_type!r}; jaxllm serves "
                     f"{', '.join(SCORE_ARCHITECTURES)}")


def family_of(model_type: str) -> Family:
    """The family serving `model_type`; ValueError lists the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; jaxllm serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    family = family_of(raw.get("model_type", "llama"))
    config = family.config(with_hf_defaults(raw))
    return dataclasses.replace(config, score_head=score_head_from_hf(raw))


def score_head_from_hf(raw: dict[str, Any]) -> ScoreHead | None:
    """The score head config.json's `architectures` names (None: a causal LM); ValueError for a
    classification or reward architecture that is not served."""
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch in SCORE_ARCHITECTURES:
        _, name = SCORE_ARCHITECTURES[arch]
        if name == "v_head":  # InternLM2's reward model: one score at the last token
            return ScoreHead(labels=1, hf_name=name)
        labels = len(raw.get("id2label") or {}) or int(raw.get("num_labels", 2))
        return ScoreHead(labels=labels, hf_name=name, pad_token_id=raw.get("pad_token_id"))
    if arch.endswith(("ForSequenceClassification", "ForRewardModel")):
        raise ValueError(f"architecture {arch!r} is not served as a reward model; jaxllm serves "
                         f"{', '.join(SCORE_ARCHITECTURES)}")
    return None


def with_hf_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` completed with the defaults of transformers' config class for its model_type (per-layer
    types, activation names, rope parameters...), for the model types transformers knows."""
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type", "llama")
    if model_type not in CONFIG_MAPPING:
        return raw
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
    return {**raw, **CONFIG_MAPPING[model_type](**fields).to_dict()}
