"""Baichuan (remote code): Llama's block with q/k/v packed as [q; k; v] in one `W_pack`. The 7B models use
rotary positions; the 13B ones ALiBi, told apart as LightLLM does by their configs: the 13B configs give no
`max_position_embeddings` (only `model_max_length`)."""

from __future__ import annotations

from jaxllm.config import ModelConfig, common_fields
from jaxllm.models import hf_map, llama
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    alibi = "max_position_embeddings" not in raw
    fields = common_fields(raw)
    fields.update(qkv_bias=False, o_bias=False)
    if alibi:
        fields.update(position="alibi", max_position_embeddings=int(raw.get("model_max_length", 4096)))
    return ModelConfig(**fields)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    for i in range(config.num_layers):
        hf, attn, mlp = f"model.layers.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        table.update(hf_map.concat_qkv(config, hf + "self_attn.W_pack", attn, bias=False))
        table.update(hf_map.out_proj(config, hf + "self_attn.o_proj", attn, bias=False))
        table.update(hf_map.gated_mlp(config, hf + "mlp.gate_proj", hf + "mlp.up_proj", hf + "mlp.down_proj", mlp))
        table.update(llama.block_norms(config, i, hf))
    return table


FAMILY = Family(model_types=("baichuan",), config=config, weights=weights)
