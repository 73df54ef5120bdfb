"""StarCoder-2 (LayerNorm with biases, plain GELU-tanh MLP, biases everywhere, sliding window) and
StarCoder / SantaCoder (`gpt_bigcode`: learned absolute positions, multi-query attention in one `c_attn`)."""

from __future__ import annotations

from jaxllm.config import ModelConfig, activation_from_hf, common_fields
from jaxllm.models import hf_map, llama
from jaxllm.models.family import Family


def starcoder2_config(raw: dict) -> ModelConfig:
    fields = common_fields(raw)
    bias = bool(raw.get("use_bias", True))
    fields.update(norm="layer", norm_bias=True, norm_eps=raw["norm_epsilon"], qkv_bias=bias, o_bias=bias,
                  mlp_bias=bias, mlp_gated=False)
    return ModelConfig(**fields)


def starcoder2_weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    for i in range(config.num_layers):
        hf, attn, mlp = f"model.layers.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        table.update(hf_map.separate_qkv(config, hf + "self_attn.q_proj", hf + "self_attn.k_proj",
                                         hf + "self_attn.v_proj", attn, config.qkv_bias))
        table.update(hf_map.out_proj(config, hf + "self_attn.o_proj", attn, config.o_bias))
        table.update(hf_map.plain_mlp(config, hf + "mlp.c_fc", hf + "mlp.c_proj", mlp))
        table.update(llama.block_norms(config, i, hf))
    return table


def bigcode_config(raw: dict) -> ModelConfig:
    hidden, heads = raw["n_embd"], raw["n_head"]
    eos = raw.get("eos_token_id")
    return ModelConfig(
        model_type="gpt_bigcode", vocab_size=raw["vocab_size"], hidden_size=hidden,
        intermediate_size=raw.get("n_inner") or 4 * hidden, num_layers=raw["n_layer"], num_heads=heads,
        num_kv_heads=1 if raw.get("multi_query", True) else heads, head_dim=hidden // heads,
        norm_eps=raw["layer_norm_epsilon"], max_position_embeddings=raw["n_positions"],
        tie_word_embeddings=raw.get("tie_word_embeddings", True), bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (), position="learned", norm="layer", norm_bias=True,
        qkv_bias=True, o_bias=True, mlp_bias=True, mlp_gated=False,
        activation=activation_from_hf(raw.get("activation_function", "gelu_pytorch_tanh")),
        attn_scale=None if raw.get("scale_attn_weights", True) else 1.0,
    )


def bigcode_weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "transformer.wte", "transformer.ln_f")
    table["transformer.wpe.weight"] = hf_map.Target(("embed_positions",), hf_map.same)
    for i in range(config.num_layers):
        hf, attn, mlp = f"transformer.h.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        if config.num_kv_heads == 1:  # multi-query: rows [q (heads × d); k (d); v (d)]
            table.update(hf_map.concat_qkv(config, hf + "attn.c_attn", attn, bias=True))
        else:  # rows per head [q; k; v]: already our grouping
            table.update(per_head_qkv(config, hf + "attn.c_attn", attn))
        table.update(hf_map.out_proj(config, hf + "attn.c_proj", attn, bias=True))
        table.update(hf_map.plain_mlp(config, hf + "mlp.c_fc", hf + "mlp.c_proj", mlp))
        table.update(hf_map.norm_targets(hf + "ln_1", hf_map.layer_path(i, "input_layernorm"), config))
        table.update(hf_map.norm_targets(hf + "ln_2", hf_map.layer_path(i, "post_attention_layernorm"), config))
    return table


def per_head_qkv(config: ModelConfig, name: str, path: hf_map.Path) -> hf_map.WeightMap:
    """One HF linear whose rows are per head [q; k; v] (MHA): our [D, heads, 3, head_dim] as it stands."""
    h, d = config.num_heads, config.head_dim
    return {
        name + ".weight": hf_map.Target(path + ("qkv_proj",), lambda w: w.T.reshape(w.shape[1], h, 3, d)),
        name + ".bias": hf_map.Target(path + ("qkv_bias",), lambda b: b.reshape(h, 3, d)),
    }


STARCODER2 = Family(model_types=("starcoder2",), config=starcoder2_config, weights=starcoder2_weights)
GPT_BIGCODE = Family(model_types=("gpt_bigcode",), config=bigcode_config, weights=bigcode_weights,
                     base_prefix="transformer.", ignored=lambda name: name.endswith(".attn.masked_bias")
                     or name.endswith(".attn.bias"))
