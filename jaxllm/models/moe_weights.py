"""Weight maps of the MoE families built on Llama's block (Mixtral, Qwen-MoE): Llama's block map, with each
MoE layer's dense MLP replaced by the family's router and experts."""

from __future__ import annotations

from typing import Callable

from jaxllm.config import ModelConfig
from jaxllm.models import hf_map, llama


def llama_blocks(config: ModelConfig, moe_map: Callable[[int, str], hf_map.WeightMap]) -> hf_map.WeightMap:
    """The whole model's map; `moe_map(i, "model.layers.{i}.")` gives MoE layer i's MLP tensors."""
    table = hf_map.embeddings_and_head(config, "model.embed_tokens", "model.norm")
    for i in range(config.num_layers):
        hf = f"model.layers.{i}."
        block = llama.layer_weights(config, i, hf)
        if config.is_moe_layer(i):
            block = {name: t for name, t in block.items() if not name.startswith(hf + "mlp.")}
            block.update(moe_map(i, hf))
        table.update(block)
    return table
