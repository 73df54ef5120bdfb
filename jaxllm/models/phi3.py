"""Phi-3: Llama's block with q/k/v packed in one `qkv_proj` ([q; k; v] rows) and gate/up in one
`gate_up_proj`; a sliding window on every layer; LongRoPE for the long-context variants."""

from __future__ import annotations

from jaxllm.config import ModelConfig, common_fields
from jaxllm.models import hf_map, llama
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    return ModelConfig(**common_fields(raw))


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    f = config.intermediate_size
    for i in range(config.num_layers):
        hf, attn, mlp = f"model.layers.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        table.update(hf_map.concat_qkv(config, hf + "self_attn.qkv_proj", attn, config.qkv_bias))
        table.update(hf_map.out_proj(config, hf + "self_attn.o_proj", attn, config.o_bias))
        table[hf + "mlp.gate_up_proj.weight"] = hf_map.Target(
            mlp + ("gate_up_proj",), lambda w: w.T.reshape(w.shape[1], 2, f))
        table[hf + "mlp.down_proj.weight"] = hf_map.Target(mlp + ("down_proj",), hf_map.transposed)
        table.update(llama.block_norms(config, i, hf))
    return table


FAMILY = Family(model_types=("phi3",), config=config, weights=weights)
