"""Mixture-of-experts families against transformers (PyTorch, float32, CPU) on tiny random configs: logits at
tp 1 and 2 (experts split on their intermediate axis), and 32 greedy tokens through the engine identical to
transformers' generate. Every weight is random (norms and biases included) and the router's scores are
spread wide enough that each expert gets tokens and the top-k choice is far from ties."""

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


def random_hf_model(raw: dict) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(**raw)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
            elif "gate.weight" in name and "shared" not in name:
                p.normal_(0, 1.0)  # routers: decisive top-k choices
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


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(family, tp):
    _, path, hf_model = family
    config = ModelConfig.from_model_dir(path)
    assert config.moe is not None and config.moe.layers
    model = build_model(config, jnp.float32)
    params = load_hf(model, path, make_mesh(tp), tp)
    tokens = np.random.default_rng(tp).integers(0, config.vocab_size, size=37)
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)[None]).logits[0].numpy()
    step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))
    logits, _ = step(params, jnp.asarray(tokens, jnp.int32), prefill_meta(len(tokens), 64), init_kv_cache(model, 64))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


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
