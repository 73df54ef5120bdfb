"""Every dense family against transformers' own implementation (PyTorch, float32, CPU) on a tiny random
config: logits at tp 1 and 2, and 32 greedy tokens through the engine identical to transformers' generate
(variants of a family, e.g. "bloom-6-heads", test what differs: their logits at tp 1).

Norm weights and biases are randomised too (transformers initialises them to ones / zeros), and windows are
shorter than the test sequences, so every feature of a family shows in its logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxllm.config import ModelConfig
from jaxllm.engine.request import SamplingParams
from jaxllm.models import build_model, init_kv_cache
from jaxllm.models.attention import AttentionMetadata
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf
from tests.engine.engine_helpers import make_engine

BASE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)
SLIDING = dict(sliding_window=12, layer_types=["sliding_attention", "full_attention"])
FAMILIES = {
    "gemma": dict(BASE, model_type="gemma", head_dim=16, tie_word_embeddings=True),
    "gemma2": dict(BASE, model_type="gemma2", head_dim=32, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, **SLIDING),
    "gemma3_text": dict(BASE, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 1000000.0}}, **SLIDING),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32),
    "phi3": dict(BASE, model_type="phi3", sliding_window=12, pad_token_id=0),
    "starcoder2": dict(BASE, model_type="starcoder2", sliding_window=12, use_bias=True, norm_epsilon=1e-5),
    "gpt_bigcode": dict(model_type="gpt_bigcode", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        multi_query=True, activation_function="gelu_pytorch_tanh"),
    "gpt_bigcode-mha": dict(model_type="gpt_bigcode", vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                            n_positions=128, multi_query=False, activation_function="gelu_pytorch_tanh"),
    "stablelm": dict(BASE, model_type="stablelm", use_qkv_bias=True, qk_layernorm=True, partial_rotary_factor=0.5),
    "stablelm-parallel": dict(BASE, model_type="stablelm", use_parallel_residual=True, partial_rotary_factor=0.25),
    "cohere": dict(BASE, model_type="cohere", use_qk_norm=True, logit_scale=0.5, tie_word_embeddings=True,
                   num_key_value_heads=4),
    "bloom": dict(model_type="bloom", vocab_size=256, hidden_size=64, n_layer=2, n_head=4),
    "bloom-6-heads": dict(model_type="bloom", vocab_size=256, hidden_size=48, n_layer=2, n_head=6),
    "olmo2": dict(BASE, model_type="olmo2"),
    "granite": dict(BASE, model_type="granite", embedding_multiplier=3.0, residual_multiplier=0.5,
                    attention_multiplier=0.2, logits_scaling=4.0, attention_bias=True),
    "llama-yarn": dict(BASE, model_type="llama", rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                    original_max_position_embeddings=16)),
    "llama-dynamic": dict(BASE, model_type="llama", rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "phi3-longrope": dict(BASE, model_type="phi3", original_max_position_embeddings=64, max_position_embeddings=256,
                          rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                                            long_factor=[2.0 + 0.3 * i for i in range(8)]), pad_token_id=0),
}


def random_hf_model(raw: dict) -> torch.nn.Module:
    """A transformers model of `raw` with every weight random, norm weights and biases included, large
    enough (std 0.15) that attention scores are far from uniform, so windows, soft-caps and ALiBi matter."""
    config = transformers.AutoConfig.for_model(**raw)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = random_hf_model(FAMILIES[request.param])
    hf_model.save_pretrained(path, safe_serialization=True)
    return request.param, path, hf_model


def prefill_meta(length: int, width: int) -> AttentionMetadata:
    return AttentionMetadata.for_sequences([(0, length)], [list(range(length))], scratch_slot=width, width=width)


def test_logits_match_transformers(family):
    """At tp 1 and 2 (a variant of a family, named "family-variant", at tp 1: what differs is not sharding)."""
    name, path, hf_model = family
    config = ModelConfig.from_model_dir(path)
    model = build_model(config, jnp.float32)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=37)
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)[None]).logits[0].numpy()
    for tp in (1,) if "-" in name else (1, 2):
        params = load_hf(model, path, make_mesh(tp), tp)
        assert config.num_params == sum(p.size for p in jax.tree.leaves(params))  # the benchmarks' roofline count
        step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))
        logits, _ = step(params, jnp.asarray(tokens, jnp.int32), prefill_meta(len(tokens), 64),
                         init_kv_cache(model, 64))
        np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0, err_msg=f"tp {tp}")


def test_engine_greedy_tokens_match_transformers_generate(family):
    """32 greedy tokens through the engine (prefill, then decode steps over the paged cache)."""
    name, path, hf_model = family
    if "-" in name:
        pytest.skip("a variant of a family: its logits test covers what differs")
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 256, size=21)]
    with make_engine(path, load_format="auto", warmup=0, max_req_total_len=64) as engine:
        (stream,) = engine.submit_many([(prompt, SamplingParams(max_new_tokens=32, ignore_eos=True), None)])
        tokens = [e.token_id for e in stream]
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    assert tokens == out[0, len(prompt):].tolist()
