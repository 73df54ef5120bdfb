"""`jaxllm.bench.models`' batch-1 floor and the configs' parameter counts on MoE and latent-attention models:
the counts match the declared weights, and a MoE token reads only its top-k experts."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.bench.models import decode_bytes_per_token
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
