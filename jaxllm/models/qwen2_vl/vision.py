"""The Qwen2-VL vision tower: patch embedding (a Conv3d over temporal × patch × patch, a matmul on flattened
patches), pre-LayerNorm blocks with 2D rotary attention and a QuickGELU MLP, and the patch merger (LayerNorm,
each 2 × 2 block of patches concatenated, a two-layer GELU MLP) → one embedding of the language model's width per
merged block.

Images run as a padded batch [images, length, ...]: a patch attends only to the patches of its own image (the
block-diagonal attention of transformers' `cu_seqlens`), so the cost is Σ length², not (Σ length)²."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import hf_map, rope
from jaxllm.models.layers import activation, dense, param
from jaxllm.models.qwen2_vl.processor import ImageGrid

_ZEROS = nn.initializers.zeros
_ONES = nn.initializers.ones
_LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """transformers' `Qwen2VLVisionConfig` fields; `out_size` is the language model's hidden size."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    out_size: int
    activation: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merged_dim(self) -> int:
        return self.embed_dim * self.merge_size ** 2

    @property
    def num_params(self) -> int:
        e, m, k = self.embed_dim, self.mlp_dim, self.merged_dim
        block = 2 * 2 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * m + m) + (m * e + e)
        merger = 2 * e + (k * k + k) + (k * self.out_size + self.out_size)
        return self.patch_dim * e + self.depth * block + merger


@dataclasses.dataclass(frozen=True)
class VisionBatch:
    """Host inputs of one batch of images, each a row padded to `length` patches (a multiple of merge²):
    patches [B, L, patch_dim] float32, positions [B, L, 2] int32 (each patch's row and column in its image's
    grid), lengths [B] int32 (patches of each image)."""

    patches: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, images: list[ImageGrid], length: int | None = None, rows: int | None = None) -> "VisionBatch":
        """`images` padded to `length` patches (default: the longest) and `rows` rows (default: one per image)."""
        sizes = [len(image.patches) for image in images]
        length = length or max(sizes)
        rows = rows or len(images)
        if length < max(sizes) or rows < len(images):
            raise ValueError(f"{len(images)} images of up to {max(sizes)} patches do not fit {rows} × {length}")
        patches = np.zeros((rows, length, images[0].patches.shape[1]), np.float32)
        positions = np.zeros((rows, length, 2), np.int32)
        for row, image in enumerate(images):
            patches[row, : sizes[row]] = image.patches
            positions[row, : sizes[row]] = patch_positions(image)
        lengths = np.zeros((rows,), np.int32)
        lengths[: len(images)] = sizes
        return cls(patches, positions, lengths)


def patch_positions(image: ImageGrid) -> np.ndarray:
    """[t·h·w, 2] (row, column) of each patch, in the processor's order (merge blocks, then within a block)."""
    t, h, w = image.grid_thw
    if t != 1:
        raise ValueError(f"an image has one frame, not {t} (videos are not served)")
    m = image.merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
    return np.stack([order(rows), order(cols)], axis=-1).astype(np.int32)


class LayerNorm(nn.Module):
    """LayerNorm with a weight and a bias over the last axis, in float32."""

    dtype: Any
    eps: float = _LAYER_NORM_EPS

    @nn.compact
    def __call__(self, x):
        size = x.shape[-1]
        weight = param(self, "weight", (size,), ("norm",), self.dtype, _ONES).astype(jnp.float32)
        bias = param(self, "bias", (size,), ("norm",), self.dtype, _ZEROS).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (normed * weight + bias).astype(self.dtype)


class VisionAttention(nn.Module):
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, key_mask):
        """x [B, L, embed]; cos, sin [B·L, head_dim // 2]; key_mask [B, L] bool (the image's own patches)."""
        c = self.config
        b, length, _ = x.shape
        h, d = c.num_heads, c.head_dim
        wqkv = param(self, "qkv_proj", (c.embed_dim, 3, h, d), ("embed", "qkv", "heads", "head_dim"), self.dtype)
        qkv = dense(x, wqkv, "bld,dshk->blshk")
        qkv = qkv + param(self, "qkv_bias", (3, h, d), ("qkv", "heads", "head_dim"), self.dtype, _ZEROS)
        q, k, v = (qkv[:, :, i].reshape(b * length, h, d) for i in range(3))
        q = rope.apply_rope(q, cos, sin).reshape(b, length, h, d)
        k = rope.apply_rope(k, cos, sin).reshape(b, length, h, d)
        v = v.reshape(b, length, h, d)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, L, heads, head_dim]
        wo = param(self, "o_proj", (h, d, c.embed_dim), ("heads", "head_dim", "embed"), self.dtype)
        return dense(out, wo, "blhk,hkd->bld") + param(self, "o_bias", (c.embed_dim,), ("norm",), self.dtype, _ZEROS)


class VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        c = self.config
        up = param(self, "up_proj", (c.embed_dim, c.mlp_dim), ("embed", "mlp"), self.dtype)
        hidden = dense(x, up, "bld,df->blf") + param(self, "up_bias", (c.mlp_dim,), ("mlp",), self.dtype, _ZEROS)
        down = param(self, "down_proj", (c.mlp_dim, c.embed_dim), ("mlp", "embed"), self.dtype)
        out = dense(activation(c.activation)(hidden), down, "blf,fd->bld")
        return out + param(self, "down_bias", (c.embed_dim,), ("norm",), self.dtype, _ZEROS)


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, key_mask):
        x = x + VisionAttention(self.config, self.dtype, name="attn")(LayerNorm(self.dtype, name="norm1")(x), cos,
                                                                      sin, key_mask)
        return x + VisionMLP(self.config, self.dtype, name="mlp")(LayerNorm(self.dtype, name="norm2")(x))


class PatchMerger(nn.Module):
    """Each merge² consecutive patches (one 2 × 2 block) → one embedding of the language model's width."""

    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):  # x [B, L, embed] → [B, L / merge², out_size]
        c = self.config
        b, length, _ = x.shape
        k = c.merged_dim
        x = LayerNorm(self.dtype, name="norm")(x).reshape(b, length // c.merge_size ** 2, k)
        w1 = param(self, "up_proj", (k, k), ("embed", "mlp"), self.dtype)
        hidden = dense(x, w1, "bnk,kf->bnf") + param(self, "up_bias", (k,), ("mlp",), self.dtype, _ZEROS)
        w2 = param(self, "down_proj", (k, c.out_size), ("mlp", "embed"), self.dtype)
        out = dense(activation("gelu")(hidden), w2, "bnf,fd->bnd")
        return out + param(self, "down_bias", (c.out_size,), ("norm",), self.dtype, _ZEROS)


class VisionTower(nn.Module):
    config: VisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, patches, positions, lengths):
        """patches [B, L, patch_dim], positions [B, L, 2], lengths [B] (a `VisionBatch`) → embeddings
        [B, L / merge², out_size]; row b's first lengths[b] / merge² are its image's tokens."""
        c = self.config
        b, length, _ = patches.shape
        if length % c.merge_size ** 2:
            raise ValueError(f"a vision batch's length ({length}) must be a multiple of {c.merge_size ** 2}")
        embed = param(self, "patch_embed", (c.patch_dim, c.embed_dim), ("patch", "embed"), self.dtype)
        x = dense(patches.astype(self.dtype), embed, "blp,pd->bld")  # [B, L, embed]
        cos, sin = rope.axial_cos_sin(c.rope_theta, c.head_dim, positions.reshape(b * length, 2))
        key_mask = jnp.arange(length)[None, :] < lengths[:, None]  # [B, L]
        for i in range(c.depth):
            x = VisionBlock(c, self.dtype, name=f"blocks_{i}")(x, cos, sin, key_mask)
        return PatchMerger(c, self.dtype, name="merger")(x)


def vision_weights(c: VisionConfig, hf: str, path: hf_map.Path) -> hf_map.WeightMap:
    """transformers' vision tower tensors (`hf` = "visual." or "model.visual.") → the tower's params under
    `path`."""
    h, d, e = c.num_heads, c.head_dim, c.embed_dim
    T = hf_map.Target
    table = {hf + "patch_embed.proj.weight": T(path + ("patch_embed",), lambda w: w.reshape(w.shape[0], -1).T)}
    for i in range(c.depth):
        src, dst = f"{hf}blocks.{i}.", path + (f"blocks_{i}",)
        attn, mlp = dst + ("attn",), dst + ("mlp",)
        table.update({
            src + "attn.qkv.weight": T(attn + ("qkv_proj",), lambda w: w.T.reshape(e, 3, h, d)),
            src + "attn.qkv.bias": T(attn + ("qkv_bias",), lambda b: b.reshape(3, h, d)),
            src + "attn.proj.weight": T(attn + ("o_proj",), lambda w: w.T.reshape(h, d, e)),
            src + "attn.proj.bias": T(attn + ("o_bias",), hf_map.same),
            **_linear(src + "mlp.fc1", mlp, "up"),
            **_linear(src + "mlp.fc2", mlp, "down"),
            **_layer_norm(src + "norm1", dst + ("norm1",)),
            **_layer_norm(src + "norm2", dst + ("norm2",)),
        })
    merger = path + ("merger",)
    table.update({**_layer_norm(hf + "merger.ln_q", merger + ("norm",)), **_linear(hf + "merger.mlp.0", merger, "up"),
                  **_linear(hf + "merger.mlp.2", merger, "down")})
    return table


def _linear(hf: str, path: hf_map.Path, name: str) -> hf_map.WeightMap:
    return {hf + ".weight": hf_map.Target(path + (f"{name}_proj",), hf_map.transposed),
            hf + ".bias": hf_map.Target(path + (f"{name}_bias",), hf_map.same)}


def _layer_norm(hf: str, path: hf_map.Path) -> hf_map.WeightMap:
    return {hf + ".weight": hf_map.Target(path + ("weight",), hf_map.same),
            hf + ".bias": hf_map.Target(path + ("bias",), hf_map.same)}
