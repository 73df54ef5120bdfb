"""`jaxllm.bench.models`' batch-1 floor and the configs' parameter counts on MoE and latent-attention models:
the counts match the declared weights, and a MoE token reads only its top-k experts; the KV bytes per token of
the model's cache, and of a per-head cache for latent attention."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.bench.models import decode_bytes_per_token, format_kv, kv_cache_report
from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.weights import abstract_params
from tests.models.test_moe_families import FAMILIES

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "configs"


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v2"])
def test_param_counts_and_batch1_bytes(name):
    config = ModelConfig.from_hf_dict(FAMILIES[name])
    # Only shapes and byte counts matter: host zeros of the declared shapes.
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), nn.unbox(abstract_params(build_model(config, jnp.float32))))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == config.num_params
    embed = config.vocab_size * config.hidden_size
    expected = (config.num_active_params - embed) * 4 + config.kv_values_per_token * 10 * 2
    assert config.num_active_params < config.num_params
    assert decode_bytes_per_token(params, config, context=10) == pytest.approx(expected)


@pytest.mark.parametrize("name,published", [("mixtral-8x7b", 46.70e9), ("deepseek-v2-lite", 15.71e9)])
def test_real_configs_declare_their_published_parameter_counts(name, published):
    config = ModelConfig.from_hf_dict(json.loads((ASSETS / f"{name}.json").read_text()))
    declared = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(abstract_params(build_model(config, jnp.bfloat16)))))
    assert declared == config.num_params
    assert declared == pytest.approx(published, rel=1e-3)


def test_kv_bytes_per_token_of_the_cache_and_of_a_per_head_cache():
    config = ModelConfig.from_hf_dict(json.loads((ASSETS / "deepseek-v2-lite.json").read_text()))
    report = kv_cache_report(build_model(config, jnp.bfloat16))
    # 27 layers × (latent 512 + rotary key 64) × 2 bytes; per head: 27 × 16 heads × (keys 128 + 64, values 128) × 2.
    assert report == {"kv_bytes_per_token": 27 * 576 * 2, "per_head_kv_bytes_per_token": 27 * 16 * 320 * 2}
    assert format_kv(report) == "KV 30.4 KiB/token (latent; a per-head cache 270.0 KiB/token, 8.9x)"
    mixtral = ModelConfig.from_hf_dict(FAMILIES["mixtral"])  # 2 layers, 2 KV heads of 16, float32
    assert kv_cache_report(build_model(mixtral, jnp.float32)) == {"kv_bytes_per_token": 2 * 2 * 2 * 16 * 4}
