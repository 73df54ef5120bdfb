"""The MoE layer's pieces on fresh random inputs: the router's choice and weights, and the grouped-matmul
experts against the padded form (every expert over every token), with ragged routings where some experts
get no token at all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.bench.experts import dense_loop, random_layer
from jaxllm.config import Moe
from jaxllm.models.layers import activation
from jaxllm.models.moe import route, routed_experts


@pytest.mark.parametrize("normalize,scale", [(True, 1.0), (False, 1.0), (False, 2.5)])
def test_route_picks_the_top_k_softmax_scores(normalize, scale):
    logits = jax.random.normal(jax.random.PRNGKey(0), (7, 6)) * 3
    moe = Moe(num_experts=6, top_k=2, intermediate_size=8, layers=(0,), normalize_top_k=normalize, routed_scale=scale)
    weights, experts = route(logits, moe)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    expected_ids = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.sort(np.asarray(experts), -1), np.sort(expected_ids, -1))
    chosen = np.take_along_axis(probs, np.asarray(experts), axis=-1)
    if normalize:
        chosen = chosen / chosen.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(weights), chosen * scale, rtol=1e-6)


@pytest.mark.parametrize("tokens,num_experts,top_k", [(1, 8, 2), (3, 8, 2), (17, 4, 3), (40, 6, 1)])
def test_grouped_experts_match_every_expert_over_every_token(tokens, num_experts, top_k):
    x, weights, experts, gate_up, down = random_layer(num_experts, 32, 24, tokens, top_k, jnp.float32, seed=tokens)
    if tokens == 40:  # a skewed routing: experts 0 and 1 only, the others empty
        experts = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(tokens, 1)), jnp.int32)
    act = activation("silu")
    got = jax.jit(routed_experts, static_argnums=5)(x, weights, experts, gate_up, down, act)
    expected = jax.jit(dense_loop, static_argnums=5)(x, weights, experts, gate_up, down, act)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


def test_what_is_not_built_is_refused_by_name():
    """An int8 latent cache and AWQ / GPTQ / FP8 checkpoints of experts are not built: building such a model
    fails with the reason, it does not run half-quantised (weight modes quantise experts: test_moe_quant.py)."""
    import dataclasses

    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model
    from jaxllm.models.backends import attention_backend
    from jaxllm.models.quant import WeightQuant
    from tests.models.test_moe_families import FAMILIES

    mixtral = ModelConfig.from_hf_dict(FAMILIES["mixtral"])
    awq = dataclasses.replace(mixtral, weight_quant=WeightQuant("w4a16", checkpoint_format="awq"))
    with pytest.raises(ValueError, match="awq checkpoints are not built for mixtures of experts"):
        build_model(awq, jnp.bfloat16)
    deepseek = ModelConfig.from_hf_dict(FAMILIES["deepseek_v2"])
    with pytest.raises(ValueError, match="int8 KV --mode values are not built for latent attention"):
        build_model(deepseek, jnp.bfloat16, attention_backend(["triton_int8kv"], "cpu"))


def test_model_with_the_pallas_experts_kernel_gives_the_same_logits():
    """The GPU's experts kernel for large steps (`expert_kernels.experts_kernel`: our Pallas grouped matmul, per
    device under shard_map at --tp 2), in interpret mode, in a whole Mixtral step: ragged_dot's logits."""
    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model, init_kv_cache
    from jaxllm.models.expert_kernels import experts_kernel
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import random_params
    from tests.models.hf_oracle import prefill_meta
    from tests.models.test_moe_families import FAMILIES

    config = ModelConfig.from_hf_dict(dict(FAMILIES["mixtral"], num_hidden_layers=1))
    tp = 2
    mesh = make_mesh(tp)
    served = build_model(config, jnp.float32)
    swapped = build_model(config, jnp.float32, experts_kernel=experts_kernel("cpu", mesh, kernel="pallas",
                                                                             interpret=True))
    params = random_params(served, mesh, tp, seed=5)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, size=11), jnp.int32)
    outs = [jax.jit(lambda p, m=model: m.apply({"params": p}, tokens, prefill_meta(11, 16), init_kv_cache(m, 16),
                                             all_logits=True)[0])(params) for model in (served, swapped)]
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), atol=1e-4, rtol=1e-4)


def test_model_with_the_latent_attention_kernel_gives_the_same_logits():
    """DeepSeek-V2 with the latent attention kernel (interpret mode, query heads split over two devices)
    against the plain-JAX form: two ragged prompts in one step, then a decode step of both over the cache."""
    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model, init_kv_cache
    from jaxllm.models.attention import AttentionMetadata
    from jaxllm.models.backends import attention_backend
    from jaxllm.models.mla import kernel_fits
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import random_params
    from tests.models.test_moe_families import FAMILIES

    # The kernel's sizes: latent and rotary key powers of two ≥ 16.
    config = ModelConfig.from_hf_dict(dict(FAMILIES["deepseek_v2-lite"], num_hidden_layers=1, kv_lora_rank=32,
                                           qk_rope_head_dim=16))
    assert kernel_fits(config)
    tp = 2
    mesh = make_mesh(tp)
    plain = build_model(config, jnp.float32)
    kernel = build_model(config, jnp.float32, attention_backend([], "cpu", interpret=True, mesh=mesh))
    params = random_params(plain, mesh, tp, seed=7)
    rng = np.random.default_rng(7)
    lengths, width = (13, 6), 32
    slots = [list(rng.permutation(40)[:20]), list(range(40, 60))]
    prompts = rng.integers(0, config.vocab_size, size=sum(lengths))
    steps = [(AttentionMetadata.for_sequences([(0, n) for n in lengths], slots, scratch_slot=64, width=width),
              jnp.asarray(prompts, jnp.int32)),
             (AttentionMetadata.for_sequences([(n, 1) for n in lengths], slots, scratch_slot=64, width=width),
              jnp.asarray(rng.integers(0, config.vocab_size, size=2), jnp.int32))]
    outs = []
    for model in (plain, kernel):
        apply = jax.jit(lambda p, t, m, c, model=model: model.apply({"params": p}, t, m, c, all_logits=True))
        cache, logits = init_kv_cache(model, 64), []
        for meta, tokens in steps:
            out, cache = apply(params, tokens, meta, cache)
            logits.append(np.asarray(out))
        outs.append(logits)
    assert steps[1][0].decode_only
    for got, expected in zip(outs[1], outs[0]):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
