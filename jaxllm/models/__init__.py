"""Model families, selected by config.json's model_type: every family runs the one decoder of
`transformer.py` with its own config normalisation and weight map (`registry.py` lists them)."""

from __future__ import annotations

import jax

from jaxllm.config import ModelConfig
from jaxllm.models.attention import AttentionBackend, AttentionMetadata, ReferenceAttention
from jaxllm.models.moe import routed_experts
from jaxllm.models.mla import init_latent_cache
from jaxllm.models.transformer import CausalLM


def init_kv_cache(model, num_slots: int) -> tuple:
    """A fresh KV cache for `model`: one backend cache tuple per layer, `num_slots` slots (+ the scratch slot)."""
    c = model.config
    if c.mla is not None:
        return tuple(init_latent_cache(c, num_slots, model.dtype) for _ in range(c.num_layers))
    return tuple(
        model.backend.init_layer_cache(num_slots, c.num_kv_heads, c.head_dim, model.dtype) for _ in range(c.num_layers)
    )


def kv_bytes_per_token(model) -> float:
    """Bytes `model`'s KV cache holds per token, all layers, in its backend's format (16-bit or int8 keys and
    values with their scales, or a latent and rotary key)."""
    size = lambda slots: sum(  # noqa: E731
        a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(lambda: init_kv_cache(model, slots))))
    return (size(2047) - size(1023)) / 1024  # caches are allocated in whole rows of 8 slots (+ the scratch)


def one_sequence(model, n: int) -> tuple:
    """(attention metadata, fresh KV cache) to run one sequence of `n` tokens from position 0 in one step."""
    meta = AttentionMetadata.for_sequences([(0, n)], [list(range(n))], scratch_slot=n, width=n)
    return meta, init_kv_cache(model, n)


def build_model(config: ModelConfig, dtype, backend: AttentionBackend | None = None, experts_kernel=None):
    """The Flax module for `config` (any supported family), computing in `dtype`. ValueError for what is not
    built: an int8 KV backend with latent attention (its own cache format), AWQ / GPTQ / FP8 checkpoints of experts.
    `experts_kernel`: MoE layers' routed experts (`expert_kernels.experts_kernel`; default `lax.ragged_dot`)."""
    backend = backend or ReferenceAttention()
    if config.mla is not None and "int8" in getattr(backend, "name", ""):
        raise ValueError(f"the int8 KV --mode values are not built for latent attention ({config.model_type})")
    held = config.weight_quant
    if config.moe is not None and held is not None and held.checkpoint_format is not None:
        raise ValueError(f"{held.checkpoint_format} checkpoints are not built for mixtures of experts "
                         f"({config.model_type}): quantise at load (--mode) or with tools.convert --quant")
    vision = None
    if config.vision is not None:
        from jaxllm.models.vision.registry import vision_family

        vision = vision_family(config.vision.family).encoder(config, dtype)
    return CausalLM(config=config, dtype=dtype, backend=backend, experts_kernel=experts_kernel or routed_experts,
                    vision=vision)
