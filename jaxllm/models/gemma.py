"""Gemma (1+w RMSNorm, GELU-tanh gated MLP, embeddings scaled by √hidden, tied head), Gemma-2 (sandwich
norms, attention and final-logit soft-capping, local/global layers with a sliding window, query scale from
`query_pre_attn_scalar`) and Gemma-3 text (q/k norms, its own rotary base on local layers)."""

from __future__ import annotations

import math

from jaxllm.config import ModelConfig, common_fields, rope_from_hf
from jaxllm.models import llama
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    fields.update(norm_plus_one=True, embed_scale=math.sqrt(fields["hidden_size"]))
    if fields["model_type"] in ("gemma2", "gemma3_text"):
        fields.update(
            norm_layout="sandwich",
            attn_scale=float(raw["query_pre_attn_scalar"]) ** -0.5,
            attn_softcap=raw.get("attn_logit_softcapping"),
            final_softcap=raw.get("final_logit_softcapping"),
        )
    if fields["model_type"] == "gemma3_text":
        params = raw["rope_parameters"]  # per layer type (transformers fills it in)
        fields.update(
            qk_norm="head",
            layer_ropes=tuple(rope_from_hf(raw, fields["head_dim"], params[t]) for t in raw["layer_types"]),
        )
    return ModelConfig(**fields)


FAMILY = Family(model_types=("gemma", "gemma2", "gemma3_text"), config=config, weights=llama.weights)
