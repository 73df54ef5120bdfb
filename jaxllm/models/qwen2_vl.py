"""Qwen2-VL (`model_type: qwen2_vl`): a Qwen2 language model with M-RoPE (its rotary frequencies in sections
turned by each token's temporal, height and width positions) fed by the vision tower and patch merger of
`jaxllm/models/vision/qwen2_vl.py`. Checkpoints name the language model `model.*` and the tower `visual.*`
(published ones, and transformers 5's save_pretrained) or `model.language_model.*` and `model.visual.*`
(transformers 5's module names); both are read."""

from __future__ import annotations

import dataclasses

from jaxllm.config import ModelConfig
from jaxllm.models import hf_map, llama
from jaxllm.models.family import Family
from jaxllm.models.vision import qwen2_vl as vision

_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))  # transformers 5 → 4 names


def rename(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def config(raw: dict) -> ModelConfig:
    # transformers 5 nests the language model's fields in text_config (tie_word_embeddings stays on top);
    # a transformers 4 config.json has them on top, with rope_scaling {"type": "mrope", "mrope_section": ...}.
    text = {**raw, **(raw.get("text_config") or {}), "model_type": "qwen2"}
    text["tie_word_embeddings"] = raw.get("tie_word_embeddings", text.get("tie_word_embeddings")) or False
    rope = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    section = tuple(rope.pop("mrope_section", ()))
    if rope.get("type") == "mrope":
        rope["type"] = "default"
    text["rope_scaling"], text["rope_parameters"] = rope, None
    if not text.get("use_sliding_window"):
        text["sliding_window"] = None
    base = llama.config(text)
    if sum(section) != base.head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} must sum to head_dim // 2 = {base.head_dim // 2}")
    if base.rope.scaling is not None:
        raise ValueError(f"rope scaling {base.rope.scaling.kind!r} is not built with M-RoPE")
    tower = vision.vision_config_from_hf(raw, base.hidden_size)
    if not 0 <= tower.image_token_id < base.vocab_size:
        raise ValueError(f"image_token_id {tower.image_token_id} is outside the vocabulary ({base.vocab_size})")
    return dataclasses.replace(base, model_type="qwen2_vl", rope=dataclasses.replace(base.rope, mrope_section=section),
                               vision=tower)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    return {**llama.weights(config), **vision.weights(config)}


FAMILY = Family(model_types=("qwen2_vl",), config=config, weights=weights, rename=rename)
