"""Qwen2-MoE (q/k/v biases; a shared expert behind a sigmoid gate) and Qwen3-MoE (q/k norms per head, no
shared expert): Llama-named blocks whose MLP is a mixture of experts on the layers the config lists."""

from __future__ import annotations

from jaxllm.config import ModelConfig, Moe, common_fields
from jaxllm.models import hf_map, moe_weights
from jaxllm.models.family import Family


def moe_layers(raw: dict, num_layers: int) -> tuple[int, ...]:
    """Every `decoder_sparse_step`-th layer, except `mlp_only_layers` (as transformers decides)."""
    step, dense = raw.get("decoder_sparse_step", 1), set(raw.get("mlp_only_layers") or ())
    if not num_experts(raw):
        return ()
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def num_experts(raw: dict) -> int:
    # transformers 5 writes Qwen3-MoE's count as num_local_experts; published checkpoints as num_experts.
    return int(raw.get("num_experts") or raw.get("num_local_experts") or 0)


def config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    qwen2 = fields["model_type"] == "qwen2_moe"
    if qwen2:
        fields.update(qkv_bias=bool(raw.get("qkv_bias", True)), o_bias=False)
    else:
        fields.update(qk_norm="head")
    shared = int(raw.get("shared_expert_intermediate_size") or 0) if qwen2 else 0
    fields["moe"] = Moe(
        num_experts=num_experts(raw),
        top_k=raw["num_experts_per_tok"],
        intermediate_size=raw["moe_intermediate_size"],
        layers=moe_layers(raw, fields["num_layers"]),
        normalize_top_k=bool(raw.get("norm_topk_prob", False)),
        shared_intermediate_size=shared,
        shared_gate=shared > 0,
    )
    return ModelConfig(**fields)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    def moe(i: int, hf: str) -> hf_map.WeightMap:
        path = hf_map.layer_path(i, "mlp")
        table = {
            **hf_map.router(hf + "mlp.gate", path),
            **hf_map.experts(config, hf + "mlp.experts.", "gate_proj", "up_proj", "down_proj", path),
        }
        if config.moe.shared_intermediate_size:
            shared = hf + "mlp.shared_expert."
            table.update(hf_map.gated_mlp(config, shared + "gate_proj", shared + "up_proj", shared + "down_proj",
                                          path + ("shared_expert",)))
            table[hf + "mlp.shared_expert_gate.weight"] = hf_map.Target(path + ("shared_expert_gate",),
                                                                        lambda w: w.reshape(-1))
        return table

    return moe_weights.llama_blocks(config, moe)


FAMILY = Family(model_types=("qwen2_moe", "qwen3_moe"), config=config, weights=weights)
