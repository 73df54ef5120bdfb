"""Every dense family against transformers' own implementation (PyTorch, float32, CPU) on a tiny random
config: logits at tp 1 and 2, and 32 greedy tokens through the engine identical to transformers' generate
(variants of a family, e.g. "bloom-6-heads", test what differs: their logits at tp 1).

Norm weights and biases are randomised too (transformers initialises them to ones / zeros), and windows are
shorter than the test sequences, so every feature of a family shows in its logits.
"""

import pytest

from tests.models.hf_oracle import assert_engine_greedy_matches, assert_logits_match, family_fixture

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


family = family_fixture(FAMILIES)


def test_logits_match_transformers(family):
    """At tp 1 and 2 (a variant of a family, named "family-variant", at tp 1: what differs is not sharding)."""
    name, path, hf_model = family
    for tp in (1,) if "-" in name else (1, 2):
        assert_logits_match(path, hf_model, tp)


def test_engine_greedy_tokens_match_transformers_generate(family):
    name, path, hf_model = family
    if "-" in name:
        pytest.skip("a variant of a family: its logits test covers what differs")
    assert_engine_greedy_matches(path, hf_model)
