"""The routed experts' kernels (`jaxllm/models/expert_kernels.py`) against the model's path with XLA's plain
`lax.ragged_dot` (`moe.routed_experts`), on fresh random weights and ragged routings where some experts get no
token: each kernel alone (the Pallas grouped matmul in interpret mode), the choice by token count, both
placements of the experts across 2 and 4 fake CPU devices, and a whole model with its experts placed per
device at tp 2 against tp 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.bench.experts import placed, random_layer
from jaxllm.config import ModelConfig
from jaxllm.models.expert_kernels import experts_kernel, kernel_for
from jaxllm.models.layers import activation
from jaxllm.models.moe import routed_experts
from jaxllm.parallel import EXPERT_PLACEMENT_ENV, logical_rules, make_mesh, with_expert_placement

ACT = activation("silu")
PALLAS_BLOCKS = dict(block_n=16, block_k=16)  # the tiny test matrices' sizes


def _layer(tokens: int, num_experts: int, top_k: int, skewed: bool):
    """(x, weights, experts, gate_up, down) of D 32, F 64; `skewed`: every token routed to experts 1 and 2 only
    (the others, and at tp 4 whole devices, get nothing)."""
    args = random_layer(num_experts, 32, 64, tokens, top_k, jnp.float32, seed=tokens + num_experts)
    if skewed:
        rng = np.random.default_rng(tokens)
        chosen = np.stack([rng.permutation([1, 2])[:top_k] for _ in range(tokens)])
        args = (args[0], args[1], jnp.asarray(chosen, jnp.int32), *args[3:])
    return args


def _expected(args):
    return np.asarray(jax.jit(routed_experts, static_argnums=5)(*args, ACT))


def test_the_kernel_follows_the_token_count():
    # Mixtral (8 experts, top 2): one decode token slices its 2 experts, XLA's ragged dot to 128 tokens, Pallas above.
    assert [kernel_for(n, 2 * n, 8) for n in (1, 2, 8, 64, 128, 256, 512, 8192)] == [
        "sliced", "ragged_dot", "ragged_dot", "ragged_dot", "ragged_dot", "pallas", "pallas", "pallas"]
    # DeepSeek-V2-Lite (64 experts, top 6): 1 and 2 tokens sliced (6 and 12 pairs), 3 tokens (18 pairs) not.
    assert [kernel_for(n, 6 * n, 64) for n in (1, 2, 3)] == ["sliced", "sliced", "ragged_dot"]
    # Experts placed per device: the device's experts count (Mixtral at tp 2: 4 each, 2 pairs > 4 / 4).
    assert kernel_for(1, 2, 4) == "ragged_dot"


@pytest.mark.parametrize("kernel", ["sliced", "pallas", "auto"])
@pytest.mark.parametrize("tokens,num_experts,top_k,skewed", [(1, 8, 2, False), (4, 4, 2, False), (5, 8, 2, True)])
def test_each_kernel_matches_ragged_dot(kernel, tokens, num_experts, top_k, skewed):
    args = _layer(tokens, num_experts, top_k, skewed)
    impl = experts_kernel("gpu", kernel=kernel, interpret=True, **PALLAS_BLOCKS)
    got = np.asarray(jax.jit(impl, static_argnums=5)(*args, ACT))
    np.testing.assert_allclose(got, _expected(args), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp,placement,kernel", [
    (2, "split", "pallas"),
    (2, "per_device", "pallas"),
    (2, "per_device", "sliced"),
    (2, "per_device", "ragged_dot"),
    (4, "per_device", "ragged_dot"),  # 2 experts a device; with the skewed routing 2 devices have no pair
    (4, "split", "ragged_dot"),
])
def test_placements_match_one_device(tp, placement, kernel):
    for tokens, skewed in ((3, False), (5, True)):
        args = _layer(tokens, 8, 2, skewed)
        impl = experts_kernel("gpu", make_mesh(tp), placement, kernel, interpret=True, **PALLAS_BLOCKS)
        got = np.asarray(jax.jit(impl, static_argnums=5)(*placed(args, tp, placement), ACT))
        np.testing.assert_allclose(got, _expected(args), atol=1e-5, rtol=1e-5, err_msg=f"{tokens} tokens")


def test_the_placement_is_chosen_by_the_environment(monkeypatch):
    from tests.models.test_moe_families import FAMILIES

    config = ModelConfig.from_hf_dict(dict(FAMILIES["mixtral"], num_local_experts=6))  # 6 experts of 96
    assert with_expert_placement(config).moe.placement == "split"
    monkeypatch.setenv(EXPERT_PLACEMENT_ENV, "per_device")
    per_device = with_expert_placement(config)
    assert per_device.moe.placement == "per_device"
    rules = dict(logical_rules(per_device, 2))
    assert (rules["experts"], rules["expert_mlp"], rules["router_experts"]) == ("tp", None, None)
    with pytest.raises(ValueError, match=r"--tp 4 must divide the experts' num_experts \(6\)"):
        logical_rules(per_device, 4)
    monkeypatch.setenv(EXPERT_PLACEMENT_ENV, "everywhere")
    with pytest.raises(ValueError, match="expert placement 'everywhere' is not one of split, per_device"):
        with_expert_placement(config)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_experts_per_device_at_tp2_give_the_logits_of_tp1(family):
    """The whole model, its experts placed per device (2 of 4 on each of 2 devices), the router and the shared
    expert as --tp serves them: tp 1's logits, and no expert weight gathered."""
    from jaxllm.models import build_model, init_kv_cache
    from jaxllm.weights import param_shardings, random_params
    from tests.models.hf_oracle import prefill_meta
    from tests.models.test_moe_families import FAMILIES

    config = ModelConfig.from_hf_dict(FAMILIES[family])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, size=19), jnp.int32)

    def logits(model, params):
        step = jax.jit(lambda p: model.apply({"params": p}, tokens, prefill_meta(19, 32), init_kv_cache(model, 32),
                                             all_logits=True)[0]).lower(params).compile()
        return np.asarray(step(params)), step.as_text()

    one = build_model(config, jnp.float32, experts_kernel=experts_kernel("cpu", make_mesh(1)))
    params = random_params(one, make_mesh(1), 1, seed=11)
    expected, _ = logits(one, params)

    per_device = with_expert_placement(config, "per_device")
    mesh = make_mesh(2)
    two = build_model(per_device, jnp.float32, experts_kernel=experts_kernel("cpu", mesh, "per_device"))
    shardings = param_shardings(two, mesh, 2)
    layer = jax.tree.leaves(shardings["layers_1"]["mlp"], is_leaf=lambda s: hasattr(s, "spec"))
    specs = {tuple(s.spec) for s in layer}
    assert ("tp", None, None, None) in specs and ("tp", None, None) in specs  # gate_up, down: whole experts
    got, hlo = logits(two, jax.device_put(params, shardings))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert "all-gather" not in hlo


def test_the_engine_loads_the_experts_where_the_environment_places_them(monkeypatch, tmp_path):
    import json

    from jaxllm.engine.loading import load_model
    from jaxllm.offline import server_args
    from tests.models.test_moe_families import FAMILIES

    (tmp_path / "config.json").write_text(json.dumps(dict(FAMILIES["mixtral"], architectures=["MixtralForCausalLM"])))
    monkeypatch.setenv(EXPERT_PLACEMENT_ENV, "per_device")
    loaded = load_model(server_args(tmp_path, tp=2, load_format="dummy", data_type="float32"), tokenizer=False)
    mlp = loaded.params["layers_0"]["mlp"]
    assert loaded.model.config.moe.placement == "per_device"
    assert tuple(mlp["experts_gate_up_proj"].sharding.spec) == ("tp", None, None, None)
    assert mlp["experts_down_proj"].addressable_shards[0].data.shape[0] == 2  # 2 of the 4 experts on each device
    assert tuple(mlp["router"].sharding.spec) in ((), (None, None))  # replicated
