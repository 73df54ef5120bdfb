"""Model families, selected by config.json's model_type: every family runs the one decoder of
`transformer.py` with its own config normalisation and weight map (`registry.py` lists them)."""

from __future__ import annotations

from jaxllm.config import ModelConfig
from jaxllm.models.attention import AttentionBackend, ReferenceAttention
from jaxllm.models.transformer import CausalLM


def init_kv_cache(model, num_slots: int) -> tuple:
    """A fresh KV cache for `model`: one backend cache tuple per layer, `num_slots` slots (+ the scratch slot)."""
    c = model.config
    return tuple(
        model.backend.init_layer_cache(num_slots, c.num_kv_heads, c.head_dim, model.dtype) for _ in range(c.num_layers)
    )


def build_model(config: ModelConfig, dtype, backend: AttentionBackend | None = None):
    """The Flax module for `config` (any supported family), computing in `dtype`."""
    return CausalLM(config=config, dtype=dtype, backend=backend or ReferenceAttention())
