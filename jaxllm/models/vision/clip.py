"""LLaVA's vision side: the CLIP ViT tower (pre-LN, class token, learned positions) read at its
`vision_feature_layer`(s), then the two-layer projector into the language model's hidden size.

Heads and MLP columns split over --tp like the language model's (logical axes "heads", "mlp").
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models import hf_map
from jaxllm.models.layers import Norm, activation, dense, param
from jaxllm.models.vision.clip_processor import ClipImageProcessor
from jaxllm.models.vision.interface import VISION_PARAMS, EncodeBatch, VisionConfig, pow2, stacked_batches
from jaxllm.models.vision.registry import register

_ZEROS = nn.initializers.zeros
TOWER = "vision_tower."  # checkpoint names (after the family's rename)
PROJECTOR = "multi_modal_projector."


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(VisionConfig):
    """The CLIP tower (transformers' CLIPVisionConfig fields), which hidden states feed the projector
    (`feature_layers`, indices into [embeddings, layer 1, …, layer L]; `select` "default" drops the class
    token, "full" keeps it) and the projector (`projector_act`, `projector_bias`, into `text_hidden`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    num_layers: int = 24  # the tower's layers in the checkpoint
    image_size: int = 336
    patch_size: int = 14
    norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    feature_layers: tuple[int, ...] = (-2,)
    select: str = "default"
    projector_act: str = "gelu"
    projector_bias: bool = True
    text_hidden: int = 4096
    # What `layers.Norm` reads of a config: CLIP's norms are LayerNorms with a bias.
    norm: str = "layer"
    norm_bias: bool = True
    norm_plus_one: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Embeddings per image: one per patch, plus the class token under "full"."""
        return self.num_patches + (1 if self.select == "full" else 0)

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """`feature_layers` as indices from the front of [embeddings, layer 1, …, layer L]."""
        return tuple(i if i >= 0 else self.num_layers + 1 + i for i in self.feature_layers)

    @property
    def layers_used(self) -> int:
        """Tower layers the selected hidden states need (the later ones are never run)."""
        return max(self.feature_indices)

    def check_tp(self, tp: int) -> None:
        for name, size in (("num_attention_heads", self.num_heads), ("intermediate_size", self.intermediate_size),
                           ("text hidden_size", self.text_hidden)):
            if size % tp:
                raise ValueError(f"--tp {tp} must divide the vision tower's {name} ({size})")


def vision_config_from_hf(raw: dict[str, Any], text_hidden: int, image_token_id: int) -> ClipVisionConfig:
    """LLaVA's config.json (completed with transformers' defaults) → ClipVisionConfig."""
    v = raw["vision_config"]
    layers = raw.get("vision_feature_layer", -2)
    select = raw.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {select!r} is not 'default' or 'full'")
    return ClipVisionConfig(
        family="clip", image_token_id=image_token_id, placeholder="<image>",
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_heads=v["num_attention_heads"],
        num_layers=v["num_hidden_layers"], image_size=v["image_size"], patch_size=v["patch_size"],
        norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"),
        feature_layers=tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),), select=select,
        projector_act=raw.get("projector_hidden_act", "gelu"),
        projector_bias=bool(raw.get("multimodal_projector_bias", True)), text_hidden=text_hidden,
    )


class ClipLayer(nn.Module):
    config: ClipVisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):  # x [batch, tokens, hidden]
        c = self.config
        h, d = c.num_heads, c.head_dim
        y = Norm(c, self.dtype, name="layer_norm1")(x)
        wqkv = param(self, "qkv_proj", (c.hidden_size, 3, h, d), ("embed", "qkv", "heads", "head_dim"), self.dtype)
        qkv = dense(y, wqkv, "bnD,Djhd->bnjhd")
        qkv = qkv + param(self, "qkv_bias", (3, h, d), ("qkv", "heads", "head_dim"), self.dtype, _ZEROS)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        wo = param(self, "o_proj", (h, d, c.hidden_size), ("heads", "head_dim", "embed"), self.dtype)
        out = dense(out, wo, "bnhd,hdD->bnD") + param(self, "o_bias", (c.hidden_size,), ("norm",), self.dtype, _ZEROS)
        x = x + out
        y = Norm(c, self.dtype, name="layer_norm2")(x)
        fc1 = param(self, "fc1", (c.hidden_size, c.intermediate_size), ("embed", "mlp"), self.dtype)
        y = dense(y, fc1, "bnD,Df->bnf") + param(self, "fc1_bias", (c.intermediate_size,), ("mlp",), self.dtype, _ZEROS)
        y = activation(c.hidden_act)(y)
        fc2 = param(self, "fc2", (c.intermediate_size, c.hidden_size), ("mlp", "embed"), self.dtype)
        y = dense(y, fc2, "bnf,fD->bnD") + param(self, "fc2_bias", (c.hidden_size,), ("norm",), self.dtype, _ZEROS)
        return x + y


class ClipLlavaEncoder(nn.Module):
    """pixels [batch, 3, H, W] → projected features [batch, num_tokens, text hidden]."""

    config: ClipVisionConfig
    dtype: Any

    @nn.compact
    def __call__(self, pixels, grid: tuple[int, ...] = ()):
        c = self.config
        b, channels, height, width = pixels.shape
        p = c.patch_size
        # Non-overlapping patches, each flattened (channel, row, column) like the conv weight [D, C, p, p].
        patches = pixels.reshape(b, channels, height // p, p, width // p, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, (height // p) * (width // p), channels * p * p).astype(self.dtype)
        w = param(self, "patch_embedding", (channels * p * p, c.hidden_size), ("patch", "embed"), self.dtype)
        x = dense(patches, w, "bnP,PD->bnD")
        cls = param(self, "class_embedding", (c.hidden_size,), ("norm",), self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), x], axis=1)
        x = x + param(self, "position_embedding", (c.num_patches + 1, c.hidden_size), ("positions", "embed"),
                      self.dtype)
        hidden = [Norm(c, self.dtype, name="pre_layrnorm")(x)]
        for i in range(c.layers_used):
            hidden.append(ClipLayer(c, self.dtype, name=f"layers_{i}")(hidden[-1]))
        features = jnp.concatenate([hidden[k] for k in c.feature_indices], axis=-1)
        if c.select == "default":
            features = features[:, 1:]
        d_in = c.hidden_size * len(c.feature_layers)
        w1 = param(self, "linear_1", (d_in, c.text_hidden), ("embed", "mlp"), self.dtype)
        y = dense(features, w1, "bnD,Dt->bnt")
        if c.projector_bias:
            y = y + param(self, "linear_1_bias", (c.text_hidden,), ("mlp",), self.dtype, _ZEROS)
        y = activation(c.projector_act)(y)
        w2 = param(self, "linear_2", (c.text_hidden, c.text_hidden), ("mlp", "embed"), self.dtype)
        y = dense(y, w2, "bnt,tT->bnT")
        if c.projector_bias:
            y = y + param(self, "linear_2_bias", (c.text_hidden,), ("norm",), self.dtype, _ZEROS)
        return y


def weights(config) -> hf_map.WeightMap:
    """The tower's used layers and the projector (names as in transformers' LLaVA, after the family's rename)."""
    c: ClipVisionConfig = config.vision
    root, h, d = (VISION_PARAMS,), c.num_heads, c.head_dim
    same, T = hf_map.same, hf_map.Target
    table = {
        TOWER + "embeddings.patch_embedding.weight": T(root + ("patch_embedding",),
                                                       lambda w: w.reshape(w.shape[0], -1).T),
        TOWER + "embeddings.class_embedding": T(root + ("class_embedding",), same),
        TOWER + "embeddings.position_embedding.weight": T(root + ("position_embedding",), same),
        TOWER + "pre_layrnorm.weight": T(root + ("pre_layrnorm", "weight"), same),
        TOWER + "pre_layrnorm.bias": T(root + ("pre_layrnorm", "bias"), same),
    }
    for i in range(c.layers_used):
        hf, at = f"{TOWER}encoder.layers.{i}.", root + (f"layers_{i}",)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            table[f"{hf}self_attn.{name}.weight"] = T(at + ("qkv_proj",), lambda w: w.T.reshape(-1, h, d),
                                                       (slice(None), j), 3)
            table[f"{hf}self_attn.{name}.bias"] = T(at + ("qkv_bias",), lambda b: b.reshape(h, d), j, 3)
        table[f"{hf}self_attn.out_proj.weight"] = T(at + ("o_proj",), lambda w: w.T.reshape(h, d, -1))
        table[f"{hf}self_attn.out_proj.bias"] = T(at + ("o_bias",), same)
        for name in ("layer_norm1", "layer_norm2"):
            table[f"{hf}{name}.weight"] = T(at + (name, "weight"), same)
            table[f"{hf}{name}.bias"] = T(at + (name, "bias"), same)
        for name in ("fc1", "fc2"):
            table[f"{hf}mlp.{name}.weight"] = T(at + (name,), hf_map.transposed)
            table[f"{hf}mlp.{name}.bias"] = T(at + (f"{name}_bias",), same)
    for name in ("linear_1", "linear_2"):
        table[f"{PROJECTOR}{name}.weight"] = T(root + (name,), hf_map.transposed)
        if c.projector_bias:
            table[f"{PROJECTOR}{name}.bias"] = T(root + (f"{name}_bias",), same)
    return table


def unused(config, name: str) -> bool:
    """Tower tensors the selected features never read: later layers, the post-layernorm, position ids."""
    if not name.startswith(TOWER):
        return False
    rest = name[len(TOWER):]
    if rest.startswith("post_layernorm.") or rest.endswith("position_ids"):
        return True
    if rest.startswith("encoder.layers."):
        return int(rest.split(".")[2]) >= config.vision.layers_used
    return False


@dataclasses.dataclass(frozen=True)
class ClipFamily:
    name: str = "clip"

    def processor(self, config, model_dir: Path | None) -> ClipImageProcessor:
        return ClipImageProcessor.for_model(config.vision, model_dir)

    def encoder(self, config, dtype) -> ClipLlavaEncoder:
        return ClipLlavaEncoder(config.vision, dtype)

    def example_batch(self, config, count: int = 1) -> EncodeBatch:
        size, tokens = config.vision.image_size, config.vision.num_tokens
        return EncodeBatch(tuple(range(count)), (np.zeros((count, 3, size, size), np.float32),), (),
                           np.tile(np.arange(tokens, dtype=np.int32), (count, 1)))

    def warmup_batches(self, config, max_batch: int) -> list[EncodeBatch]:
        # Every image is image_size square: the batches are the powers of two up to max_batch rows.
        return [self.example_batch(config, 2**i) for i in range(pow2(max_batch).bit_length())]

    def batches(self, config, images, max_batch: int) -> list[EncodeBatch]:
        return stacked_batches(images, max_batch)

    def weights(self, config) -> hf_map.WeightMap:
        return weights(config)

    def rope_positions(self, config, images, start, stop):
        return None  # not an M-RoPE model: the runner never asks


FAMILY = register(ClipFamily())
