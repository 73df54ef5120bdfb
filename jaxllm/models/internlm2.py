"""InternLM2 (remote code): Llama's block with q/k/v packed per KV group in one `wqkv` (rows
[kv_heads, group + 2, head_dim]: each KV head's queries, then its key and value, our own layout) and its
own tensor names."""

from __future__ import annotations

from jaxllm.config import ModelConfig, common_fields
from jaxllm.models import hf_map
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    bias = bool(raw.get("bias", True))
    fields.update(qkv_bias=bias, o_bias=bias)
    return ModelConfig(**fields)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    kv, g, d = config.num_kv_heads, config.group_size, config.head_dim
    table = hf_map.embeddings_and_head(config, "model.tok_embeddings", "model.norm", head="output")
    for i in range(config.num_layers):
        hf, attn, mlp = f"model.layers.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        table[hf + "attention.wqkv.weight"] = hf_map.Target(
            attn + ("qkv_proj",), lambda w: w.T.reshape(w.shape[1], kv, g + 2, d))
        if config.qkv_bias:
            table[hf + "attention.wqkv.bias"] = hf_map.Target(attn + ("qkv_bias",), lambda b: b.reshape(kv, g + 2, d))
        table.update(hf_map.out_proj(config, hf + "attention.wo", attn, config.o_bias))
        table.update(hf_map.gated_mlp(config, hf + "feed_forward.w1", hf + "feed_forward.w3", hf + "feed_forward.w2",
                                      mlp))
        table.update(hf_map.norm_targets(hf + "attention_norm", hf_map.layer_path(i, "input_layernorm"), config))
        table.update(hf_map.norm_targets(hf + "ffn_norm", hf_map.layer_path(i, "post_attention_layernorm"), config))
    return table


FAMILY = Family(model_types=("internlm2",), config=config, weights=weights)
