"""The Llama family as one Flax module: llama 1/2/3 (with Llama-3 rope scaling), mistral, qwen2, SmolLM2.

`__call__(tokens [n], meta, kv_cache) -> (logits, kv_cache)`: one step over packed tokens of any mix of
prefill chunks and decodes. Layers are unrolled (a scanned stack made XLA copy weight slices per step).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models.attention import AttentionBackend, AttentionMetadata
from jaxllm.models.layers import MLP, Attention, RMSNorm, param


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: Any
    backend: AttentionBackend

    @nn.compact
    def __call__(self, x, meta, layer_cache):
        c = self.config
        attn_out, layer_cache = Attention(c, self.dtype, self.backend, name="self_attn")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x), meta, layer_cache
        )
        x = x + attn_out
        x = x + MLP(c, self.dtype, name="mlp")(RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x))
        return x, layer_cache


class LlamaForCausalLM(nn.Module):
    config: ModelConfig
    dtype: Any
    backend: AttentionBackend

    @nn.compact
    def __call__(self, tokens, meta: AttentionMetadata, kv_cache: tuple, all_logits: bool = False):
        """tokens [n] int32; kv_cache: one backend cache tuple per layer.

        Returns logits float32 [rows, vocab] at `meta.logits_index` ([n, vocab] with `all_logits`)
        and the updated cache.
        """
        c = self.config
        embed = param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"), self.dtype)
        x = embed[tokens]  # [n, hidden]
        new_cache = []
        for i in range(c.num_layers):
            x, layer_cache = DecoderLayer(c, self.dtype, self.backend, name=f"layers_{i}")(x, meta, kv_cache[i])
            new_cache.append(layer_cache)
        if not all_logits:
            x = x[meta.logits_index]
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x)
        if c.tie_word_embeddings:
            logits = jnp.einsum("nd,vd->nv", x, embed)
        else:
            head = param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), self.dtype)
            logits = x @ head
        return logits.astype(jnp.float32), tuple(new_cache)
