"""Shared Flax layers of the Llama family: RMSNorm, rotary embedding, attention over the KV cache, MLP.

Each weight is declared once, with its logical axes; `jaxllm/parallel.py` maps those axes onto the mesh.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.models.attention import AttentionBackend, AttentionMetadata

_INIT = nn.initializers.normal(stddev=0.02)


def param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init=_INIT):
    """Declare one weight with its logical axes (for sharding, loading and random init alike)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):  # x [n, hidden]
        weight = param(self, "weight", (x.shape[-1],), ("norm",), self.dtype, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * weight.astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jnp.ndarray:
    """Inverse frequencies [head_dim // 2], with Llama-3's long-context rescaling when configured."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotate-half rotary embedding (Hugging Face's layout). x [n, heads, head_dim]; positions [n]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [n, head_dim/2]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    config: ModelConfig
    dtype: Any
    backend: AttentionBackend

    @nn.compact
    def __call__(self, x, meta: AttentionMetadata, layer_cache):  # x [n, hidden]
        c = self.config
        kv_heads, group, d = c.num_kv_heads, c.group_size, c.head_dim
        # q, k and v in one product (at batch 1 three small products cost twice one fused one). Heads are
        # grouped per KV head, [kv_heads, group + 2, head_dim], so splitting on KV heads keeps each
        # device's query heads with their own keys and values.
        wqkv = param(self, "qkv_proj", (c.hidden_size, kv_heads, group + 2, d),
                     ("embed", "kv_heads", "qkv", "head_dim"), self.dtype)
        wo = param(self, "o_proj", (c.num_heads, d, c.hidden_size), ("heads", "head_dim", "embed"), self.dtype)
        qkv = jnp.einsum("nd,dkjh->nkjh", x, wqkv)  # [n, kv_heads, group + 2, head_dim]
        if c.qkv_bias:
            qkv = qkv + param(self, "qkv_bias", (kv_heads, group + 2, d), ("kv_heads", "qkv", "head_dim"),
                              self.dtype, nn.initializers.zeros)
        q = qkv[:, :, :group].reshape(x.shape[0], c.num_heads, d)  # head h = kv * group + g, as in HF
        k, v = qkv[:, :, group], qkv[:, :, group + 1]  # [n, kv_heads, head_dim]
        inv_freq = rope_inv_freq(d, c.rope_theta, c.rope_scaling)
        q = apply_rope(q, meta.positions, inv_freq)
        k = apply_rope(k, meta.positions, inv_freq)
        layer_cache = self.backend.write(layer_cache, k, v, meta)
        out = self.backend.attend(q, layer_cache, meta, 1.0 / math.sqrt(d))  # [n, heads, d]
        return jnp.einsum("nhk,hkd->nd", out, wo), layer_cache


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):  # x [n, hidden]
        c = self.config
        # gate and up in one product: [hidden, 2, intermediate], split on the intermediate axis under --tp.
        gate_up = param(self, "gate_up_proj", (c.hidden_size, 2, c.intermediate_size), ("embed", "stack", "mlp"),
                        self.dtype)
        down = param(self, "down_proj", (c.intermediate_size, c.hidden_size), ("mlp", "embed"), self.dtype)
        h = jnp.einsum("nd,dsf->nsf", x, gate_up)  # [n, 2, intermediate]
        return (jax.nn.silu(h[:, 0]) * h[:, 1]) @ down
