"""The Llama layout: llama 1/2/3 (Llama-3 rope scaling), mistral, qwen2 (q/k/v biases), SmolLM2, and
checkpoints that ship Llama's layout under their own name (Yi, InternLM v1, ...)."""

from __future__ import annotations


from jaxllm.config import ModelConfig, common_fields
from jaxllm.models import hf_map
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    model_type = fields["model_type"]
    if model_type == "qwen2":
        fields.update(qkv_bias=True, o_bias=False)
    if model_type == "internlm":  # InternLM v1: `bias` switches the q/k/v/o biases
        fields.update(qkv_bias=bool(raw.get("bias", True)), o_bias=bool(raw.get("bias", True)))
    fields["mlp_bias"] = bool(raw.get("mlp_bias", False))
    return ModelConfig(**fields)


def llama_layer_weights(config: ModelConfig, i: int, hf: str) -> hf_map.WeightMap:
    """One Llama-named block (`hf` = "model.layers.{i}.") with pre-norms."""
    attn, mlp = hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
    return {
        **hf_map.separate_qkv(config, hf + "self_attn.q_proj", hf + "self_attn.k_proj", hf + "self_attn.v_proj",
                              attn, config.qkv_bias),
        **hf_map.out_proj(config, hf + "self_attn.o_proj", attn, config.o_bias),
        **hf_map.gated_mlp(config, hf + "mlp.gate_proj", hf + "mlp.up_proj", hf + "mlp.down_proj", mlp),
        **hf_map.norm_targets(hf + "input_layernorm", hf_map.layer_path(i, "input_layernorm"), config),
        **hf_map.norm_targets(hf + "post_attention_layernorm", hf_map.layer_path(i, "post_attention_layernorm"),
                              config),
    }


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    for i in range(config.num_layers):
        table.update(llama_layer_weights(config, i, f"model.layers.{i}."))
    return table


FAMILY = Family(
    model_types=("llama", "mistral", "qwen2", "Yi", "internlm"),
    config=config,
    weights=weights,
    deepspeed=True,
)

