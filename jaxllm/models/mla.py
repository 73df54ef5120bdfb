"""Multi-head latent attention (DeepSeek-V2): the KV cache holds, per token, one compressed latent and one
rotary key shared by all heads; attention runs in the latent space, the key up-projection absorbed into the
query and the value up-projection applied to the output (the backend's `attend_latent`:
`kernels/pallas/latent_attention.py` on the GPU, `kernels/pallas/reference.py: latent_attention` its plain form).

Params: `q_proj` [D, heads, nope + rope] (or `q_a_proj` [D, q_rank], `q_a_layernorm`, `q_b_proj`
[q_rank, heads, nope + rope]), `kv_a_proj` [D, kv_rank + rope], `kv_a_layernorm`, `kv_b_proj`
[heads, nope + v, kv_rank] (each head's key then value up-projection, as Hugging Face stores them: heads leading,
so that both absorbed products are batched over heads without a transpose of the weights), `o_proj` [heads, v, D].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models import rope
from jaxllm.models.attention import AttentionBackend, AttentionMetadata
from jaxllm.models.layers import Norm, dense, param
from kernels.pallas import latent_attention


def init_latent_cache(config: ModelConfig, num_slots: int, dtype) -> tuple:
    """One layer's cache: ([num_slots + 1, 1, kv_rank + rope_dim],), the last slot the scratch slot."""
    return (jnp.zeros((num_slots + 1, 1, config.mla.cache_dim), dtype),)


def kernel_fits(config: ModelConfig) -> bool:
    """Whether the latent attention kernel takes this model's sizes (else the plain-JAX form runs)."""
    return latent_attention.fits(config.mla.kv_rank, config.mla.rope_dim)


def softmax_scale(config: ModelConfig) -> float:
    """1 / sqrt(nope + rope), times YaRN's mscale(factor, mscale_all_dim)² when the rotary is YaRN-scaled."""
    a = config.mla
    scale = 1.0 / math.sqrt(a.nope_dim + a.rope_dim)
    s = config.rope.scaling
    if s is not None and s.kind == "yarn" and s.mscale_all_dim and s.factor > 1:
        mscale = 0.1 * s.mscale_all_dim * math.log(s.factor) + 1.0
        scale *= mscale * mscale
    return scale


class LatentAttention(nn.Module):
    config: ModelConfig
    layer: int
    dtype: Any
    backend: AttentionBackend  # its attend_latent: the kernel on the GPU, the plain-JAX form on the CPU

    @nn.compact
    def __call__(self, x, meta: AttentionMetadata, layer_cache):  # x [n, hidden]
        c, a = self.config, self.config.mla
        d, h = c.hidden_size, c.num_heads
        qk = a.nope_dim + a.rope_dim
        if a.q_rank is None:
            q = dense(x, param(self, "q_proj", (d, h, qk), ("embed", "heads", "head_dim"), self.dtype), "nd,dhk->nhk")
        else:
            q_a = dense(x, param(self, "q_a_proj", (d, a.q_rank), ("embed", "latent"), self.dtype), "nd,dr->nr")
            q_a = Norm(c, self.dtype, name="q_a_layernorm")(q_a)
            q_b = param(self, "q_b_proj", (a.q_rank, h, qk), ("latent", "heads", "head_dim"), self.dtype)
            q = dense(q_a, q_b, "nr,rhk->nhk")
        q_nope, q_rope = q[..., : a.nope_dim], q[..., a.nope_dim :]  # [n, heads, nope], [n, heads, rope]
        kv_a = dense(x, param(self, "kv_a_proj", (d, a.cache_dim), ("embed", "latent"), self.dtype), "nd,dr->nr")
        latent = Norm(c, self.dtype, name="kv_a_layernorm")(kv_a[:, : a.kv_rank])  # [n, kv_rank]
        k_rope = kv_a[:, None, a.kv_rank :]  # [n, 1, rope]: one rotary key for all heads
        r = c.layer_rope(self.layer)
        cos, sin = rope.cos_sin(r, a.rope_dim, meta.positions)
        q_rope = rope.apply_rope(q_rope, cos, sin, r.interleaved)
        k_rope = rope.apply_rope(k_rope, cos, sin, r.interleaved)
        (cache,) = layer_cache
        cache = cache.at[meta.write_slots].set(jnp.concatenate([latent[:, None], k_rope], -1).astype(cache.dtype))
        kv_b = param(self, "kv_b_proj", (h, a.nope_dim + a.v_dim, a.kv_rank), ("heads", "head_dim", "latent"),
                     self.dtype)
        q_latent = dense(q_nope, kv_b[:, : a.nope_dim], "nhk,hkr->nhr")  # key up-projection absorbed
        out = self.backend.attend_latent(
            jnp.concatenate([q_latent, q_rope], -1), cache, meta, softmax_scale(c), a.kv_rank
        )  # [n, heads, kv_rank]
        out = dense(out, kv_b[:, a.nope_dim :], "nhr,hvr->nhv")  # value up-projection
        wo = param(self, "o_proj", (h, a.v_dim, d), ("heads", "head_dim", "embed"), self.dtype)
        return dense(out, wo, "nhv,hvd->nd", split_sum=True), (cache,)
