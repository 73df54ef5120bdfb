"""Llama-family logits against Hugging Face transformers (PyTorch, float32, CPU), at tp = 1, 2 and 4."""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf
from tests.models.hf_oracle import assert_logits_match

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512, rope_theta=10000.0,
)
VARIANTS = {
    "llama2-mha": dict(BASE, model_type="llama", num_key_value_heads=4),
    "llama3-gqa-rope-scaling": dict(
        BASE, model_type="llama", rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    "mistral": dict(BASE, model_type="mistral", sliding_window=None),
    "qwen2-qkv-bias": dict(BASE, model_type="qwen2", use_sliding_window=False),
    "smollm2-tied": dict(BASE, model_type="llama", tie_word_embeddings=True),
}
HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def save_random_hf_model(raw: dict, path) -> torch.nn.Module:
    config_cls, model_cls = HF_CLASSES[raw["model_type"]]
    # crc32, not hash(): str hashes change with each process's PYTHONHASHSEED, and the model with them
    torch.manual_seed(zlib.crc32(json.dumps(raw, sort_keys=True).encode()) % 2**31)
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    model = model_cls(config_cls(**fields)).eval()
    with torch.no_grad():  # HF initialises biases to zero; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_random_hf_model(VARIANTS[request.param], path)
    return path, hf_model


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_logits_match_transformers(variant, tp):
    path, hf_model = variant
    assert_logits_match(path, hf_model, tp)


def test_chunked_prefill_and_decode_over_cache_match_one_pass(variant):
    """Prefill in two chunks, then decode token by token, through scattered KV slots: same logits."""
    path, hf_model = variant
    config = ModelConfig.from_model_dir(path)
    model = build_model(config, jnp.float32)
    params = load_hf(model, path, make_mesh(1), 1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, size=24)
    slots = [int(s) for s in rng.permutation(100)[:24]]  # non-contiguous slots
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)[None]).logits[0].numpy()
    cache = init_kv_cache(model, 100)
    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c))
    got = []
    for start, count in [(0, 10), (10, 8)] + [(p, 1) for p in range(18, 24)]:
        meta = AttentionMetadata.for_sequences([(start, count)], [slots[: start + count]], 100, 32)
        logits, cache = step(params, jnp.asarray(tokens[start : start + count], jnp.int32), meta, cache)
        got.append((start + count - 1, np.asarray(logits[0])))
    for pos, row in got:
        np.testing.assert_allclose(row, expected[pos], atol=1e-4, rtol=0)

