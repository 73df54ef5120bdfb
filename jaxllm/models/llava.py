"""LLaVA-1.5 (`model_type: llava`): a CLIP tower and projector (`jaxllm/models/vision/clip.py`) feeding any
language model this project serves (Llama / Vicuna for LLaVA-1.5), whose own family gives its config and
weight map. Checkpoints name the language model `language_model.model.*` (transformers 4) or
`model.language_model.*` (transformers 5); both are read."""

from __future__ import annotations

import dataclasses

from jaxllm.config import ModelConfig
from jaxllm.models import hf_map
from jaxllm.models.family import Family
from jaxllm.models.vision import clip

_RENAMES = (  # checkpoint prefix → the name the weight map uses, applied in turn
    ("model.language_model.", "model."),  # transformers 5's modules
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("language_model.model.", "model."),  # llava-hf checkpoints
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),  # CLIPVisionModel's wrapper (absent when saved by 5)
)


def rename(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            name = new + name[len(old):]
    return name


def _text_family(config_or_raw) -> Family:
    from jaxllm.models.registry import family_of  # the registry imports this module

    text_type = config_or_raw if isinstance(config_or_raw, str) else config_or_raw.vision.text_model_type
    if text_type == "llava":
        raise ValueError("a LLaVA text_config cannot itself be LLaVA")
    return family_of(text_type)


@dataclasses.dataclass(frozen=True)
class LlavaVisionConfig(clip.ClipVisionConfig):
    text_model_type: str = "llama"  # the language model's family


def config(raw: dict) -> ModelConfig:
    from jaxllm.models.registry import with_hf_defaults

    text_raw = with_hf_defaults(dict(raw["text_config"]))
    text_type = text_raw.get("model_type", "llama")
    text = _text_family(text_type).config(text_raw)
    image_token_id = raw.get("image_token_id", raw.get("image_token_index", 32000))
    base = clip.vision_config_from_hf(raw, text.hidden_size, image_token_id)
    vision = LlavaVisionConfig(**dataclasses.asdict(base), text_model_type=text_type)
    if not 0 <= image_token_id < text.vocab_size:
        raise ValueError(f"image_token_id {image_token_id} is outside the vocabulary ({text.vocab_size})")
    return dataclasses.replace(text, model_type="llava", vision=vision)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    return {**_text_family(config).weights(config), **clip.weights(config)}


def ignored(name: str) -> bool:
    return name.endswith(("rotary_emb.inv_freq", "position_ids"))


FAMILY = Family(model_types=("llava",), config=config, weights=weights, ignored=ignored, rename=rename,
                unused=clip.unused)
