"""Qwen2-VL's vision side: the tower (patch embedding — a Conv3d over temporal × patch × patch, so a matmul on
flattened patches —, pre-LayerNorm blocks with 2D rotary attention and a QuickGELU MLP) and the patch merger
(LayerNorm, each 2 × 2 block of patches concatenated, a two-layer GELU MLP into the language model's width);
and the family object the multimodal pipeline calls (M-RoPE positions: `mrope.py`).

Images run as a batch [images, patches, ...]; a patch attends only to its own image's patches (transformers'
`cu_seqlens`), so a padded batch of images of different sizes costs Σ patches², not (Σ patches)². Heads and
MLP columns split over --tp like the language model's (logical axes "heads", "mlp")."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import hf_map, rope
from jaxllm.models.vision import mrope
from jaxllm.models.layers import Norm, activation, dense, param
from jaxllm.models.vision.interface import VISION_PARAMS, EncodeBatch, ImageInput, VisionConfig, pow2
from jaxllm.models.vision.qwen2_vl_processor import Qwen2VLImageProcessor
from jaxllm.models.vision.registry import register

_ZEROS = nn.initializers.zeros
TOWER = "visual."  # checkpoint names (after the family's rename)
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # one image in Qwen2-VL's chat template


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig(VisionConfig):
    """transformers' `Qwen2VLVisionConfig` fields; `out_size` is the language model's hidden size."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_dim: int = 5120
    out_size: int = 3584
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    rope_theta: float = 10000.0
    # What `layers.Norm` reads of a config: the tower's norms are LayerNorms with a bias.
    norm: str = "layer"
    norm_bias: bool = True
    norm_plus_one: bool = False
    norm_eps: float = 1e-6

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

    def check_tp(self, tp: int) -> None:
        for name, size in (("num_heads", self.num_heads), ("MLP width", self.mlp_dim),
                           ("merger width", self.merged_dim)):
            if size % tp:
                raise ValueError(f"--tp {tp} must divide the vision tower's {name} ({size})")


def vision_config_from_hf(raw: dict[str, Any], text_hidden: int) -> Qwen2VLVisionConfig:
    """Qwen2-VL's config.json (completed with transformers' defaults) → Qwen2VLVisionConfig."""
    v = raw["vision_config"]
    embed = v["embed_dim"]
    return Qwen2VLVisionConfig(
        family="qwen2_vl", image_token_id=int(raw["image_token_id"]), placeholder=PLACEHOLDER,
        depth=v["depth"], embed_dim=embed, num_heads=v["num_heads"], mlp_dim=int(embed * v["mlp_ratio"]),
        out_size=text_hidden, hidden_act=v.get("hidden_act", "quick_gelu"),
        in_channels=v.get("in_channels", v.get("in_chans", 3)), patch_size=v["patch_size"],
        temporal_patch_size=v["temporal_patch_size"], merge_size=v["spatial_merge_size"],
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )


# --- the tower -----------------------------------------------------------------------------------

class VisionAttention(nn.Module):
    config: Qwen2VLVisionConfig
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
    """fc1 → activation → fc2, both with biases (a block's MLP, and the merger's)."""

    config: Qwen2VLVisionConfig
    dtype: Any
    act: str
    in_size: int
    mlp_size: int
    out_size: int

    @nn.compact
    def __call__(self, x):
        up = param(self, "up_proj", (self.in_size, self.mlp_size), ("embed", "mlp"), self.dtype)
        hidden = dense(x, up, "...d,df->...f") + param(self, "up_bias", (self.mlp_size,), ("mlp",), self.dtype, _ZEROS)
        down = param(self, "down_proj", (self.mlp_size, self.out_size), ("mlp", "embed"), self.dtype)
        out = dense(activation(self.act)(hidden), down, "...f,fd->...d")
        return out + param(self, "down_bias", (self.out_size,), ("norm",), self.dtype, _ZEROS)


class VisionBlock(nn.Module):
    config: Qwen2VLVisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, key_mask):
        c = self.config
        x = x + VisionAttention(c, self.dtype, name="attn")(Norm(c, self.dtype, name="norm1")(x), cos, sin, key_mask)
        mlp = VisionMLP(c, self.dtype, c.hidden_act, c.embed_dim, c.mlp_dim, c.embed_dim, name="mlp")
        return x + mlp(Norm(c, self.dtype, name="norm2")(x))


class Qwen2VLVisionTower(nn.Module):
    """The tower and merger (interface.py's encoder): images → [B, tokens, text hidden]."""

    config: Qwen2VLVisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, pixels, positions=None, lengths=None, grid: tuple[int, ...] = ()):
        """pixels [B, L, patch_dim]: a padded batch of images of any sizes (`padded_batch`: positions [B, L, 2],
        lengths [B]), or B images of one patch `grid` (t, h, w). → [B, L / merge², out_size]: row b's first
        lengths[b] / merge² rows are its image's embeddings."""
        c = self.config
        b, length, _ = pixels.shape
        if length % c.merge_size ** 2:
            raise ValueError(f"a vision batch's length ({length}) must be a multiple of {c.merge_size ** 2}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.asarray(patch_positions(grid, c.merge_size)), (b, length, 2))
            lengths = jnp.full((b,), length, jnp.int32)
        embed = param(self, "patch_embed", (c.patch_dim, c.embed_dim), ("patch", "embed"), self.dtype)
        x = dense(pixels.astype(self.dtype), embed, "blp,pd->bld")  # [B, L, embed]
        cos, sin = rope.axial_cos_sin(c.rope_theta, c.head_dim, positions.reshape(b * length, 2))
        key_mask = jnp.arange(length)[None, :] < lengths[:, None]  # [B, L]
        for i in range(c.depth):
            x = VisionBlock(c, self.dtype, name=f"blocks_{i}")(x, cos, sin, key_mask)
        # The merger: each merge² consecutive patches (one 2 × 2 block) → one embedding.
        x = Norm(c, self.dtype, name="merger_norm")(x).reshape(b, length // c.merge_size ** 2, c.merged_dim)
        return VisionMLP(c, self.dtype, "gelu", c.merged_dim, c.merged_dim, c.out_size, name="merger")(x)


def padded_batch(images: list[ImageInput], merge_size: int, length: int,
                 rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images of any sizes as the tower's inputs, each a row padded to `length` patches (a multiple of merge²),
    `rows` rows: patches [rows, length, patch_dim] float32, positions [rows, length, 2] int32 (each patch's row
    and column in its image), lengths [rows] int32 (0 for a padding row)."""
    patches = np.zeros((rows, length, images[0].pixels.shape[1]), np.float32)
    positions = np.zeros((rows, length, 2), np.int32)
    lengths = np.zeros((rows,), np.int32)
    for row, image in enumerate(images):
        n = len(image.pixels)
        patches[row, :n] = image.pixels
        positions[row, :n] = patch_positions(image.grid, merge_size)
        lengths[row] = n
    return patches, positions, lengths


def length_bucket(patches: int) -> int:
    """A padded batch's length: the first of 16, 24, 32, 48, 64, 96, … (powers of two and 1.5 times them) that
    holds `patches`: two compiled lengths per doubling, at most a third of padding."""
    bucket = 16
    while bucket < patches:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return bucket


def encode_batches(images: list[ImageInput], merge_size: int, max_batch: int) -> list[EncodeBatch]:
    """The images, by size, in padded batches of at most `max_batch` (rows a power of two, lengths
    `length_bucket`s): few compiled shapes whatever the images' sizes."""
    order = sorted(range(len(images)), key=lambda i: len(images[i].pixels))
    batches = []
    for at in range(0, len(order), max_batch):
        chunk = order[at : at + max_batch]
        members = [images[i] for i in chunk]
        length, rows = length_bucket(max(len(m.pixels) for m in members)), pow2(len(chunk))
        index = np.full((rows, length // merge_size ** 2), -1, np.int32)
        for row, image in enumerate(members):
            index[row, : image.num_tokens] = np.arange(image.num_tokens)
        batches.append(EncodeBatch(tuple(chunk), padded_batch(members, merge_size, length, rows), (), index))
    return batches


def patch_positions(grid: tuple[int, ...], merge_size: int) -> np.ndarray:
    """[h·w, 2] (row, column) of each patch of a one-frame `grid` (1, h, w), in the processor's order (merge
    blocks row-major, then the patches of a block row-major)."""
    t, h, w = grid
    if t != 1:
        raise ValueError(f"an image has one frame, not {t} (videos are not served)")
    m = merge_size
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
    return np.stack([order(rows), order(cols)], axis=-1).astype(np.int32)


# --- weights ---------------------------------------------------------------------------------------

def weights(config) -> hf_map.WeightMap:
    """transformers' tower and merger tensors (`visual.*` after the family's rename) → params under
    (VISION_PARAMS, ...)."""
    c: Qwen2VLVisionConfig = config.vision
    h, d, e = c.num_heads, c.head_dim, c.embed_dim
    path, T = (VISION_PARAMS,), hf_map.Target
    table = {TOWER + "patch_embed.proj.weight": T(path + ("patch_embed",), lambda w: w.reshape(w.shape[0], -1).T)}
    for i in range(c.depth):
        src, dst = f"{TOWER}blocks.{i}.", path + (f"blocks_{i}",)
        attn = dst + ("attn",)
        table.update({
            src + "attn.qkv.weight": T(attn + ("qkv_proj",), lambda w: w.T.reshape(e, 3, h, d)),
            src + "attn.qkv.bias": T(attn + ("qkv_bias",), lambda b: b.reshape(3, h, d)),
            src + "attn.proj.weight": T(attn + ("o_proj",), lambda w: w.T.reshape(h, d, e)),
            src + "attn.proj.bias": T(attn + ("o_bias",), hf_map.same),
            **_linear(src + "mlp.fc1", dst + ("mlp",), "up"),
            **_linear(src + "mlp.fc2", dst + ("mlp",), "down"),
            **_layer_norm(src + "norm1", dst + ("norm1",)),
            **_layer_norm(src + "norm2", dst + ("norm2",)),
        })
    table.update({**_layer_norm(TOWER + "merger.ln_q", path + ("merger_norm",)),
                  **_linear(TOWER + "merger.mlp.0", path + ("merger",), "up"),
                  **_linear(TOWER + "merger.mlp.2", path + ("merger",), "down")})
    return table


def _linear(hf: str, path: hf_map.Path, name: str) -> hf_map.WeightMap:
    return {hf + ".weight": hf_map.Target(path + (f"{name}_proj",), hf_map.transposed),
            hf + ".bias": hf_map.Target(path + (f"{name}_bias",), hf_map.same)}


def _layer_norm(hf: str, path: hf_map.Path) -> hf_map.WeightMap:
    return {hf + ".weight": hf_map.Target(path + ("weight",), hf_map.same),
            hf + ".bias": hf_map.Target(path + ("bias",), hf_map.same)}


# --- the vision family -----------------------------------------------------------------------------

class Qwen2VLVision:
    """interface.py's `VisionFamily` for Qwen2-VL."""

    name = "qwen2_vl"

    def processor(self, config, model_dir: Path | None) -> Qwen2VLImageProcessor:
        processor = Qwen2VLImageProcessor.from_model_dir(model_dir) if model_dir else Qwen2VLImageProcessor()
        c: Qwen2VLVisionConfig = config.vision
        if (processor.patch_size, processor.merge_size, processor.temporal_patch_size) != \
                (c.patch_size, c.merge_size, c.temporal_patch_size):
            raise ValueError("preprocessor_config.json's patch, merge and temporal patch sizes differ from "
                             "config.json's vision_config")
        return processor

    def encoder(self, config, dtype) -> Qwen2VLVisionTower:
        return Qwen2VLVisionTower(config.vision, dtype)

    def example_batch(self, config) -> EncodeBatch:
        c: Qwen2VLVisionConfig = config.vision
        m = c.merge_size
        image = ImageInput(np.zeros((m * m, c.patch_dim), np.float32), num_tokens=1, digest="", grid=(1, m, m))
        return encode_batches([image], m, max_batch=1)[0]

    def warmup_batches(self, config, max_batch: int) -> list[EncodeBatch]:
        return [self.example_batch(config)]  # real calls' shapes follow each image's size: compiled when met

    def batches(self, config, images: list[ImageInput], max_batch: int) -> list[EncodeBatch]:
        return encode_batches(images, config.vision.merge_size, max_batch)

    def weights(self, config) -> hf_map.WeightMap:
        return weights(config)

    def rope_positions(self, config, images: list[mrope.ImagePlace], start: int, stop: int) -> np.ndarray:
        """[3, stop − start] M-RoPE positions of a request's positions start..stop; `images`: (first position,
        grid) of each image of its prompt, in order."""
        return mrope.positions(images, config.vision.merge_size, start, stop)


register(Qwen2VLVision())
