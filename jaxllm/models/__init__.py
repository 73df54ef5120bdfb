"""Model families, selected by config.json's model_type."""

from __future__ import annotations

from jaxllm.config import ModelConfig
from jaxllm.models.attention import AttentionBackend, ReferenceAttention
from jaxllm.models.llama import LlamaForCausalLM

_FAMILIES = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}


def build_model(config: ModelConfig, dtype, backend: AttentionBackend | None = None):
    """The Flax module for `config.model_type`, computing in `dtype`."""
    family = _FAMILIES[config.model_type]
    return family(config=config, dtype=dtype, backend=backend or ReferenceAttention())
