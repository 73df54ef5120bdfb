"""Mixture-of-experts families against transformers (PyTorch, float32, CPU) on tiny random configs: logits at
tp 1 and 2 (experts split on their intermediate axis), and 32 greedy tokens through the engine identical to
transformers' generate (`hf_oracle.py`). Every weight is random, routers and norms included."""

import pytest

from tests.models.hf_oracle import assert_engine_greedy_matches, assert_logits_match, family_fixture

BASE = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=2,
)
FAMILIES = {
    "mixtral": dict(BASE, model_type="mixtral", intermediate_size=96, num_local_experts=4),
    "qwen2_moe": dict(BASE, model_type="qwen2_moe", intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                      shared_expert_intermediate_size=48, mlp_only_layers=[0]),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                      head_dim=32, norm_topk_prob=True),
    # Latent attention (q through its own latent) with YaRN rotary scaling (its mscale changes the softmax
    # scale); layer 0 dense, layer 1 MoE with a shared expert.
    "deepseek_v2": dict(BASE, model_type="deepseek_v2", num_key_value_heads=4, intermediate_size=96,
                        moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                        routed_scaling_factor=1.5,
                        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
}
# DeepSeek-V2-Lite's layout: queries straight from the hidden state (no q latent).
FAMILIES["deepseek_v2-lite"] = dict(FAMILIES["deepseek_v2"], q_lora_rank=None, rope_scaling=None)
# DeepSeek-V2's group-limited routing: 8 experts in 4 groups, the top 3 from the best 2 groups.
FAMILIES["deepseek_v2-groups"] = dict(FAMILIES["deepseek_v2-lite"], n_routed_experts=8, num_experts_per_tok=3,
                                      topk_method="group_limited_greedy", n_group=4, topk_group=2)


family = family_fixture(FAMILIES)


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(family, tp):
    _, path, hf_model = family
    config = assert_logits_match(path, hf_model, tp)
    assert config.moe is not None and config.moe.layers


def test_engine_greedy_tokens_match_transformers_generate(family):
    name, path, hf_model = family
    if "-" in name:
        pytest.skip("a variant of a family: its logits test covers what differs")
    assert_engine_greedy_matches(path, hf_model)
