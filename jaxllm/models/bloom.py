"""BLOOM: ALiBi instead of rotary, LayerNorm with biases (also right after the embedding), q/k/v fused per
head, biases everywhere, plain GELU-tanh MLP of 4 × hidden, tied head."""

from __future__ import annotations

from jaxllm.config import ModelConfig
from jaxllm.models import hf_map
from jaxllm.models.family import Family
from jaxllm.models.starcoder import per_head_qkv


def config(raw: dict) -> ModelConfig:
    hidden = raw.get("hidden_size") or raw["n_embed"]
    heads = raw.get("n_head") or raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    return ModelConfig(
        model_type="bloom", vocab_size=raw["vocab_size"], hidden_size=hidden, intermediate_size=4 * hidden,
        num_layers=raw.get("n_layer") or raw["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, norm_eps=raw["layer_norm_epsilon"],
        max_position_embeddings=raw.get("seq_length") or 2048,
        tie_word_embeddings=raw.get("tie_word_embeddings", True), bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (), position="alibi", norm="layer", norm_bias=True,
        embed_norm=True, qkv_bias=True, o_bias=True, mlp_bias=True, mlp_gated=False, activation="gelu_tanh",
    )


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "transformer.word_embeddings", "transformer.ln_f")
    table.update(hf_map.norm_targets("transformer.word_embeddings_layernorm", ("embed_norm",), config))
    for i in range(config.num_layers):
        hf, attn, mlp = f"transformer.h.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        table.update(per_head_qkv(config, hf + "self_attention.query_key_value", attn))
        table.update(hf_map.out_proj(config, hf + "self_attention.dense", attn, bias=True))
        table.update(hf_map.plain_mlp(config, hf + "mlp.dense_h_to_4h", hf + "mlp.dense_4h_to_h", mlp))
        for name in ("input_layernorm", "post_attention_layernorm"):
            table.update(hf_map.norm_targets(hf + name, hf_map.layer_path(i, name), config))
    return table


FAMILY = Family(model_types=("bloom",), config=config, weights=weights, base_prefix="transformer.")
