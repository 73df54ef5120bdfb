"""Baichuan and Baichuan 2 (remote code): Llama's block with q/k/v packed as [q; k; v] in one `W_pack`. The
7B models use rotary positions, the 13B ones ALiBi: their configs give no `max_position_embeddings` (only
`model_max_length`). Baichuan 2 (its 125,696-token vocabulary tells it apart) normalises each row of its
head before use (`NormHead`): done once, at load."""

from __future__ import annotations

from jaxllm.config import ModelConfig, common_fields
from jaxllm.models import hf_map, llama
from jaxllm.models.family import Family

BAICHUAN2_VOCAB = 125696


def config(raw: dict) -> ModelConfig:
    alibi = "max_position_embeddings" not in raw
    fields = common_fields(raw)
    fields.update(qkv_bias=False, o_bias=False)
    if alibi:
        fields.update(position="alibi", max_position_embeddings=int(raw.get("model_max_length", 4096)))
    return ModelConfig(**fields)


def weights(config: ModelConfig) -> hf_map.WeightMap:
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    if config.vocab_size == BAICHUAN2_VOCAB and not config.tie_word_embeddings:
        table["lm_head.weight"] = hf_map.Target(("lm_head",), _normalised_head)
    for i in range(config.num_layers):
        hf, attn, mlp = f"model.layers.{i}.", hf_map.layer_path(i, "self_attn"), hf_map.layer_path(i, "mlp")
        table.update(hf_map.concat_qkv(config, hf + "self_attn.W_pack", attn, bias=False))
        table.update(hf_map.out_proj(config, hf + "self_attn.o_proj", attn, bias=False))
        table.update(hf_map.gated_mlp(config, hf + "mlp.gate_proj", hf + "mlp.up_proj", hf + "mlp.down_proj", mlp))
        table.update(llama.block_norms(config, i, hf))
    return table


FAMILY = Family(model_types=("baichuan",), config=config, weights=weights)


def _normalised_head(w):
    """NormHead: each vocabulary row [V, D] scaled to unit L2 norm (in float32), then to our [D, V]."""
    xp = hf_map.array_module(w)
    w32 = w.astype(xp.float32)
    return (w32 / xp.maximum(xp.linalg.norm(w32, axis=1, keepdims=True), 1e-12)).T
