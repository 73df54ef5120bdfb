"""The decoder every family runs: embedding → unrolled blocks (attention + MLP, with the family's norm
layout) → final norm → head (the LM head, or a reward model's score head). A family differs only in its
`ModelConfig` fields and its weight map.

`__call__(tokens [n], meta, kv_cache) -> (logits, kv_cache)`: one step over packed tokens of any mix of
prefill chunks and decodes. Layers are unrolled (a scanned stack made XLA copy weight slices per step), each
applied through one nested jit per kind of layer (`apply_layer_traced_once`): a step traces and lowers each kind
once, not each layer, and XLA inlines the calls back into the unrolled program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import LAYOUT_NORMS, ModelConfig
from jaxllm.models.attention import AttentionBackend, AttentionMetadata
from jaxllm.models.layers import MLP, Attention, Norm, dense, dense_tap_active, param, soft_cap
from jaxllm.models.mla import LatentAttention
from jaxllm.models.moe import MoE, routed_experts
from jaxllm.models.quant import QUANTISED_WEIGHTS



class DecoderLayer(nn.Module):
    """One block. Norm layouts: "pre" x + f(norm(x)) (Llama); "sandwich" x + norm(f(norm(x))) (Gemma-2/3);
    "post" x + norm(f(x)) (OLMo-2); "parallel" x + attn(norm(x)) + mlp(norm(x)) (Cohere)."""

    config: ModelConfig
    layer: int
    dtype: Any
    backend: AttentionBackend
    experts_kernel: Callable = routed_experts  # MoE layers' routed experts (`expert_kernels.py`)

    @nn.compact
    def __call__(self, x, meta, layer_cache):
        c = self.config
        attn = (LatentAttention if c.mla else Attention)(c, self.layer, self.dtype, self.backend, name="self_attn")
        if c.is_moe_layer(self.layer):
            mlp = MoE(c, self.dtype, self.experts_kernel, name="mlp")
        else:
            mlp = MLP(c, self.dtype, name="mlp")
        norm = lambda name: Norm(c, self.dtype, name=name)  # noqa: E731
        scale = lambda h: h if c.residual_scale == 1.0 else h * c.residual_scale  # noqa: E731
        # Attention and the dense MLP use their input only in products, so a norm before them may hand over its
        # rows unapplied (`Norm(..., into_products=True)`: a product can fold it into its own prologue).
        attn_rows, mlp_rows = isinstance(attn, Attention), isinstance(mlp, MLP)
        layout = c.norm_layout
        if layout == "parallel":
            h = norm("input_layernorm")(x, attn_rows and mlp_rows)
            attn_out, layer_cache = attn(h, meta, layer_cache)
            return x + scale(attn_out) + scale(mlp(h)), layer_cache
        if layout == "pre":
            attn_out, layer_cache = attn(norm("input_layernorm")(x, attn_rows), meta, layer_cache)
            x = x + scale(attn_out)
            return x + scale(mlp(norm("post_attention_layernorm")(x, mlp_rows))), layer_cache
        if layout == "sandwich":
            attn_out, layer_cache = attn(norm("input_layernorm")(x, attn_rows), meta, layer_cache)
            x = x + scale(norm("post_attention_layernorm")(attn_out))
            ffn_in = norm("pre_feedforward_layernorm")(x, mlp_rows)
            return x + scale(norm("post_feedforward_layernorm")(mlp(ffn_in))), layer_cache
        if layout == "post":
            attn_out, layer_cache = attn(x, meta, layer_cache)
            x = x + scale(norm("post_attention_layernorm")(attn_out))
            return x + scale(norm("post_feedforward_layernorm")(mlp(x))), layer_cache
        raise ValueError(f"norm layout {layout!r} is not one of {', '.join(LAYOUT_NORMS)}")


def layer_kind(config: ModelConfig, layer: int) -> tuple:
    """What sets decoder layer `layer`'s computation apart from another's, its weights aside: the layers of one
    kind run the same program on different weights (every use of a layer's index in the model is here)."""
    quant = config.weight_quant
    return (config.layer_rope(layer), config.layer_window(layer), config.is_moe_layer(layer),
            None if quant is None else tuple(quant.quantises(layer, name) for name in QUANTISED_WEIGHTS))


def first_layer_of_each_kind(config: ModelConfig) -> list[int]:
    """For each layer, the first layer of its kind (`layer_kind`)."""
    first: dict[tuple, int] = {}
    return [first.setdefault(layer_kind(config, i), i) for i in range(config.num_layers)]


class _OneLayer(nn.Module):
    """Decoder layer `layer` alone, named as in the model (a weight's path says which layer it belongs to)."""

    config: ModelConfig
    layer: int
    dtype: Any
    backend: AttentionBackend
    experts_kernel: Callable

    @nn.compact
    def __call__(self, x, meta, layer_cache):
        return DecoderLayer(self.config, self.layer, self.dtype, self.backend, self.experts_kernel,
                            name=f"layers_{self.layer}")(x, meta, layer_cache)


@functools.partial(jax.jit, static_argnums=(0,))
def apply_layer_traced_once(one: _OneLayer, params, x, meta, layer_cache):
    """Layer `one.layer`'s program on any layer of its kind's `params`, as one nested jit: the layers of a kind
    share one trace and one lowering (a 32-layer Llama step lowered in ~1/5 of the time)."""
    return one.apply({"params": {f"layers_{one.layer}": params}}, x, meta, layer_cache)


class CausalLM(nn.Module):
    config: ModelConfig
    dtype: Any
    backend: AttentionBackend
    experts_kernel: Callable = routed_experts  # MoE layers' routed experts (`expert_kernels.py`)
    # A vision-language model's encoder (tower + projector, `jaxllm/models/vision/interface.py`), params
    # under "vision"; None for a text model.
    vision: nn.Module | None = None

    def encode_images(self, *inputs, grid: tuple = ()):
        """An `EncodeBatch`'s inputs → image embeddings [B, T, hidden] (`model.apply(..., *inputs, grid=static,
        method=CausalLM.encode_images)`; `jaxllm/models/vision/interface.py`)."""
        return self.vision(*inputs, grid=grid)

    @nn.compact
    def __call__(self, tokens, meta: AttentionMetadata, kv_cache: tuple, all_logits: bool = False,
                 image_embeds=None, image_mask=None):
        """tokens [n] int32; kv_cache: one backend cache tuple per layer; image_embeds [n, hidden] replace
        the token embeddings where image_mask [n] is set (a vision-language model's image tokens).

        Returns logits float32 [rows, vocab] at `meta.logits_index` ([n, vocab] with `all_logits`)
        and the updated cache; a model with a score head returns its scores [rows, labels] instead.
        """
        c = self.config
        if self.vision is not None and self.is_initializing():  # declare the encoder's params too
            from jaxllm.models.vision.registry import vision_family

            example = vision_family(c.vision.family).example_batch(c)
            self.vision(*example.inputs, grid=example.static)
        embed = param(self, "embed_tokens", (c.vocab_size, c.hidden_size), ("vocab", "embed"), self.dtype)
        x = embed[tokens]  # [n, hidden]
        if image_embeds is not None:
            if c.rope.mrope_section and meta.rope_positions is None:  # image tokens sit on a grid of positions
                raise ValueError(f"{c.model_type}: a step with images needs its tokens' M-RoPE positions "
                                 "(AttentionMetadata.rope_positions)")
            x = jnp.where(image_mask[:, None], image_embeds.astype(x.dtype), x)
        if c.position == "learned":
            table = param(self, "embed_positions", (c.max_position_embeddings, c.hidden_size), ("positions", "embed"),
                          self.dtype)
            x = x + table[meta.positions]
        if c.embed_scale != 1.0:
            x = x * jnp.asarray(c.embed_scale, self.dtype)  # Gemma rounds the scale to the model's dtype
        if c.embed_norm:
            x = Norm(c, self.dtype, name="embed_norm")(x)
        new_cache = []
        # Initialising declares each layer's weights; a dense tap (calibration) must see every layer's trace.
        traced_once = not self.is_initializing() and not dense_tap_active()
        firsts = first_layer_of_each_kind(c)
        for i in range(c.num_layers):
            if traced_once:
                one = _OneLayer(c, firsts[i], self.dtype, self.backend, self.experts_kernel, parent=None)
                x, layer_cache = apply_layer_traced_once(one, self.variables["params"][f"layers_{i}"], x, meta,
                                                         kv_cache[i])
            else:
                layer = DecoderLayer(c, i, self.dtype, self.backend, self.experts_kernel, name=f"layers_{i}")
                x, layer_cache = layer(x, meta, kv_cache[i])
            new_cache.append(layer_cache)
        if not all_logits:
            x = x[meta.logits_index]
        x = Norm(c, self.dtype, name="norm")(x)
        if c.score_head is not None:  # a reward model: its scores [rows, labels] in place of logits
            head = param(self, "score", (c.hidden_size, c.score_head.labels), ("embed", "labels"), self.dtype)
            return dense(x, head, "nd,dl->nl").astype(jnp.float32), tuple(new_cache)
        if c.tie_word_embeddings:
            logits = dense(x, embed, "nd,vd->nv")
        else:
            head = param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), self.dtype)
            logits = dense(x, head, "nd,dv->nv")
        logits = logits.astype(jnp.float32)
        if c.logit_scale != 1.0:
            logits = logits * c.logit_scale
        return soft_cap(logits, c.final_softcap), tuple(new_cache)
