"""Qwen (1) (remote code): RMSNorm pre-norm blocks, q/k/v as [q; k; v] in one `c_attn` with a bias, a
gated SiLU MLP whose `intermediate_size` counts both halves (`w2` is the gate, `w1` the up projection).
Its logn attention scaling and dynamic NTK act past `seq_length` only and are not built: positions up to
it are exact, and an engine asked for longer requests (--max_req_total_len) refuses to start."""

from __future__ import annotations

from jaxllm.config import ModelConfig, Rope
from jaxllm.models import hf_map
from jaxllm.models.family import Family


def config(raw: dict) -> ModelConfig:
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    head_dim = raw.get("kv_channels") or hidden // heads
    eos = raw.get("eos_token_id")
    return ModelConfig(
        model_type="qwen", vocab_size=raw["vocab_size"], hidden_size=hidden,
        intermediate_size=raw["intermediate_size"] // 2, num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, norm_eps=raw.get("layer_norm_epsilon", 1e-6),
        max_position_embeddings=raw.get("seq_length", 8192),
        tie_word_embeddings=raw.get("tie_word_embeddings", False), bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (),
        rope=Rope(theta=float(raw.get("rotary_emb_base", 10000.0)),
                  rotary_dim=int(head_dim * raw.get("rotary_pct", 1.0))),
        qkv_bias=True, o_bias=not raw.get("no_bias", True),
        max_context=raw.get("seq_length", 8192) if raw.get("use_logn_attn") or raw.get("use_dynamic_ntk") else None,
    )


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "transformer.wte", "transformer.ln_f")
    for i in range(config.num_layers):
        hf, attn, mlp = f"transformer.h.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        table.update(hf_map.concat_qkv(config, hf + "attn.c_attn", attn, bias=True))
        table.update(hf_map.out_proj(config, hf + "attn.c_proj", attn, config.o_bias))
        table.update(hf_map.gated_mlp(config, hf + "mlp.w2", hf + "mlp.w1", hf + "mlp.c_proj", mlp))
        table.update(hf_map.norm_targets(hf + "ln_1", hf_map.layer_path(i, "input_layernorm"), config))
        table.update(hf_map.norm_targets(hf + "ln_2", hf_map.layer_path(i, "post_attention_layernorm"), config))
    return table


FAMILY = Family(model_types=("qwen",), config=config, weights=weights, base_prefix="transformer.")
