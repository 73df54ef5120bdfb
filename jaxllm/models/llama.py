"""The Llama layout and its close kin (same tensor names, a few config fields apart): llama 1/2/3,
mistral, qwen2 (q/k/v biases), qwen3 (q/k norms), granite (residual multipliers), olmo2 (post-norms,
q/k norms over all heads), SmolLM2, and checkpoints that ship Llama's layout under their own name
(Yi, InternLM v1)."""

from __future__ import annotations


from jaxllm.config import LAYOUT_NORMS, ModelConfig, common_fields
from jaxllm.models import hf_map
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    model_type = fields["model_type"]
    if model_type == "qwen2":
        fields.update(qkv_bias=True, o_bias=False)
    elif model_type == "qwen3":
        fields.update(qk_norm="head")
    elif model_type == "internlm":  # InternLM v1: `bias` switches the q/k/v/o biases
        fields.update(qkv_bias=bool(raw.get("bias", True)), o_bias=bool(raw.get("bias", True)))
    elif model_type == "granite":
        fields.update(
            embed_scale=float(raw["embedding_multiplier"]), residual_scale=float(raw["residual_multiplier"]),
            attn_scale=float(raw["attention_multiplier"]), logit_scale=1.0 / float(raw["logits_scaling"]),
        )
    elif model_type == "olmo2":
        fields.update(norm_layout="post", qk_norm="all")
    return ModelConfig(**fields)


def layer_weights(config: ModelConfig, i: int, hf: str) -> hf_map.WeightMap:
    """One Llama-named block (`hf` = "model.layers.{i}."): q/k/v/o, optional q/k norms, the gated MLP and
    the norms of the config's layout."""
    attn, mlp = hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
    table = {
        **hf_map.separate_qkv(config, hf + "self_attn.q_proj", hf + "self_attn.k_proj", hf + "self_attn.v_proj",
                              attn, config.qkv_bias),
        **hf_map.out_proj(config, hf + "self_attn.o_proj", attn, config.o_bias),
        **hf_map.gated_mlp(config, hf + "mlp.gate_proj", hf + "mlp.up_proj", hf + "mlp.down_proj", mlp),
        **block_norms(config, i, hf),
    }
    if config.qk_norm is not None:
        for name in ("q_norm", "k_norm"):
            table[f"{hf}self_attn.{name}.weight"] = hf_map.Target(attn + (name, "weight"), hf_map.same)
    return table


def block_norms(config: ModelConfig, i: int, hf: str) -> hf_map.WeightMap:
    """The layout's per-block norms, named as in Llama-style checkpoints."""
    table = {}
    for name in LAYOUT_NORMS[config.norm_layout]:
        table.update(hf_map.norm_targets(hf + name, hf_map.layer_path(i, name), config))
    return table


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    for i in range(config.num_layers):
        table.update(layer_weights(config, i, f"model.layers.{i}."))
    return table


FAMILY = Family(
    model_types=("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "Yi", "internlm"),
    config=config,
    weights=weights,
    deepspeed=True,
)
