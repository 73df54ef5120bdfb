"""The published configs the GPU benchmarks use (tests/assets/configs) build models of their published
parameter counts, with the features their families need (checked without allocating any weight; the
count is extrapolated from 1- and 2-layer traces, as layers are alike and tracing 42 of them is slow)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxllm.config import ModelConfig
from jaxllm.models import build_model
from jaxllm.weights import abstract_params

CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs"
PUBLISHED = {"gemma-2-9b": 9.2417e9, "qwen3-8b": 8.1907e9, "phi-3-mini-4k": 3.8211e9}


def _count(config: ModelConfig, layers: int) -> int:
    shrunk = dataclasses.replace(config, num_layers=layers, layer_windows=config.layer_windows[:layers])
    params = nn.unbox(abstract_params(build_model(shrunk, jnp.bfloat16)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_builds_its_published_parameter_count(name):
    config = ModelConfig.from_hf_dict(json.loads((CONFIGS / f"{name}.json").read_text()))
    one, two = _count(config, 1), _count(config, 2)
    count = one + (config.num_layers - 1) * (two - one)
    assert count == pytest.approx(PUBLISHED[name], rel=1e-4)
    assert config.num_params == count  # the roofline of jaxllm.bench.step counts the same weights
    assert config.num_params == pytest.approx(count, rel=1e-4)


def test_gemma2_config_has_its_local_layers_and_soft_caps():
    config = ModelConfig.from_hf_dict(json.loads((CONFIGS / "gemma-2-9b.json").read_text()))
    assert config.layer_windows[:4] == (4096, None, 4096, None) and len(config.layer_windows) == 42
    assert (config.attn_softcap, config.final_softcap, config.attn_scale) == (50.0, 30.0, 1 / 16)
    assert config.norm_layout == "sandwich" and config.norm_plus_one and config.embed_scale == pytest.approx(3584**0.5)
