"""DeepSeek-V2 (and -Lite): multi-head latent attention (`mla.py`) in every layer; a dense MLP in the first
`first_k_dense_replace` layers, then mixtures of experts with shared experts and a float32 router."""

from __future__ import annotations

from jaxllm.config import ModelConfig, Mla, Moe, common_fields, rope_from_hf
from jaxllm.models import hf_map
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    method = raw.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"deepseek_v2: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    grouped = method == "group_limited_greedy"
    if raw.get("attention_bias"):
        raise ValueError("deepseek_v2: attention_bias is not supported")
    fields = common_fields(raw)
    mla = Mla(kv_rank=raw["kv_lora_rank"], rope_dim=raw["qk_rope_head_dim"], nope_dim=raw["qk_nope_head_dim"],
              v_dim=raw["v_head_dim"], q_rank=raw.get("q_lora_rank"))
    layers = fields["num_layers"]
    first_moe, every = raw.get("first_k_dense_replace", 0), raw.get("moe_layer_freq", 1)
    experts = raw.get("n_routed_experts")
    shared = raw.get("n_shared_experts") or 0
    fields.update(
        head_dim=mla.nope_dim + mla.rope_dim,
        num_kv_heads=fields["num_heads"],
        rope=rope_from_hf(raw, mla.rope_dim, interleaved=True),  # rotary pairs are adjacent dims
        qkv_bias=False,
        o_bias=False,
        mla=mla,
        moe=None if not experts else Moe(
            num_experts=experts,
            top_k=raw["num_experts_per_tok"],
            intermediate_size=raw["moe_intermediate_size"],
            layers=tuple(i for i in range(first_moe, layers) if i % every == 0),
            normalize_top_k=bool(raw.get("norm_topk_prob", False)),
            routed_scale=float(raw.get("routed_scaling_factor", 1.0)),
            router_float32=True,
            groups=int(raw["n_group"]) if grouped else 1,
            top_groups=int(raw["topk_group"]) if grouped else 1,
            shared_intermediate_size=raw["moe_intermediate_size"] * shared,
        ),
    )
    return ModelConfig(**fields)


def attention_weights(config: ModelConfig, hf: str, path: hf_map.Path) -> hf_map.WeightMap:
    a, h = config.mla, config.num_heads
    qk = a.nope_dim + a.rope_dim
    table = {
        hf + "kv_a_proj_with_mqa.weight": hf_map.Target(path + ("kv_a_proj",), hf_map.transposed),
        hf + "kv_a_layernorm.weight": hf_map.Target(path + ("kv_a_layernorm", "weight"), hf_map.same),
        # [heads * (nope + v), kv_rank] → [heads, nope + v, kv_rank]
        hf + "kv_b_proj.weight": hf_map.Target(path + ("kv_b_proj",), lambda w: w.reshape(h, -1, a.kv_rank)),
        hf + "o_proj.weight": hf_map.Target(path + ("o_proj",), lambda w: w.T.reshape(h, a.v_dim, w.shape[0])),
    }
    if a.q_rank is None:
        table[hf + "q_proj.weight"] = hf_map.Target(path + ("q_proj",), lambda w: w.T.reshape(w.shape[1], h, qk))
    else:
        table.update({
            hf + "q_a_proj.weight": hf_map.Target(path + ("q_a_proj",), hf_map.transposed),
            hf + "q_a_layernorm.weight": hf_map.Target(path + ("q_a_layernorm", "weight"), hf_map.same),
            hf + "q_b_proj.weight": hf_map.Target(path + ("q_b_proj",), lambda w: w.T.reshape(a.q_rank, h, qk)),
        })
    return table


def mlp_weights(config: ModelConfig, i: int, hf: str) -> hf_map.WeightMap:
    path = hf_map.layer_path(i, "mlp")
    if not config.is_moe_layer(i):
        return hf_map.gated_mlp(config, hf + "gate_proj", hf + "up_proj", hf + "down_proj", path)
    shared = hf + "shared_experts."
    return {
        **hf_map.router(hf + "gate", path),
        **hf_map.experts(config, hf + "experts.", "gate_proj", "up_proj", "down_proj", path),
        **hf_map.gated_mlp(config, shared + "gate_proj", shared + "up_proj", shared + "down_proj",
                           path + ("shared_expert",)),
    }


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    for i in range(config.num_layers):
        hf = f"model.layers.{i}."
        table.update(attention_weights(config, hf + "self_attn.", hf_map.layer_path(i, "self_attn")))
        table.update(mlp_weights(config, i, hf + "mlp."))
        for name in ("input_layernorm", "post_attention_layernorm"):
            table.update(hf_map.norm_targets(hf + name, hf_map.layer_path(i, name), config))
    return table


FAMILY = Family(model_types=("deepseek_v2",), config=config, weights=weights)
