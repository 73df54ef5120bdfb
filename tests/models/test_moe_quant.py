"""Weight quantisation of mixtures of experts: each scheme's grouped product against its plain form on ragged
routings; Mixtral, Qwen2-MoE (shared expert) and DeepSeek-V2 (latent attention, a dense first layer)
quantised at load against the same models with those weights dequantised (float32); tp 2 on fake CPU devices
against tp 1; `tools.convert --quant` output loading to the same weights."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache, quant
from jaxllm.models.qgrouped import grouped_dot, merged_outputs
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf, load_params
from kernels.pallas import reference
from tests.models.hf_oracle import prefill_meta, saved_random_hf_model
from tests.models.test_moe_families import FAMILIES

TOKENS = np.random.default_rng(7).integers(0, 256, size=19)
SCHEMES = ("w8a16", "w4a16", "w8a8", "fp8_w8a8")
WEIGHT_ONLY = ("w8a16", "w4a16")


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _ragged_reference(x, w, sizes):
    """Row by row: x[r] @ w[group of r] with w [E, K, N] plain float32."""
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out = np.zeros((x.shape[0], w.shape[-1]), np.float32)
    for g in range(len(sizes)):
        out[bounds[g]:bounds[g + 1]] = x[bounds[g]:bounds[g + 1]] @ w[g]
    return out


@pytest.mark.parametrize("scheme,int8_kernel", [(s, "auto") for s in SCHEMES] + [("w8a16", "pallas")])
def test_grouped_product_of_each_scheme_matches_its_plain_form(scheme, int8_kernel):
    """[E, K, F, 2] experts quantised, merged to [E, K, 2F], times rows ragged by expert (one expert empty):
    the weights dequantised, and for w8a8 / fp8 the rows as quantised per row, in a plain per-group product;
    each expert quantised as the dense weight would be. w8a16 also by the Pallas kernel (interpret mode on the CPU)."""
    rng = np.random.default_rng(3)
    experts, k, f = 4, 64, 24
    w = jnp.asarray(rng.normal(size=(experts, k, f, 2)), jnp.float32)
    sizes = np.array([5, 0, 9, 3], np.int32)
    x = jnp.asarray(rng.normal(size=(int(sizes.sum()), k)), jnp.float32)
    quantise = {"w8a8": reference.quantize_rows_int8, "fp8_w8a8": reference.quantize_rows_fp8}.get(scheme)

    @jax.jit
    def run(w, x):
        q = quant.quantize(w, quant.WeightQuant(scheme), in_axes=1, lead_axes=1)
        rows = x
        if quantise is not None:
            x_q, x_scale = quantise(x)
            rows = x_q.astype(jnp.float32) * x_scale[:, None]
        dense = quant.quantize(w[2], quant.WeightQuant(scheme), in_axes=1)
        return (q, grouped_dot(x, merged_outputs(q), jnp.asarray(sizes), int8_kernel=int8_kernel), rows,
                quant.dequantize(q).reshape(experts, k, 2 * f), dense)

    q, got, rows, dequantised, dense = run(w, x)
    assert q.shape == w.shape and q.lead_axes == 1
    expected = _ragged_reference(np.asarray(rows), np.asarray(dequantised), sizes)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-4, rtol=1e-5)
    for field, expert_field in zip(jax.tree.leaves(dense), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(expert_field[2]), np.asarray(field))


def test_sliced_pairs_match_the_grouped_products():
    """`expert_kernels.sliced_experts` (a single GPU's path for a few pairs: one `qdot.dot` per pair of its
    expert's quantised weight) gives the grouped products' result: a decode token's top-2 of 4, int8 and int4
    weights (w8a8 and fp8 differ from them in `qdot.dot` only, checked in test_quant.py)."""
    from jaxllm.bench.experts import random_layer
    from jaxllm.models.expert_kernels import sliced_experts
    from jaxllm.models.layers import activation
    from jaxllm.models.moe import routed_experts

    x, weights, experts, gate_up, down = random_layer(4, 64, 32, 1, 2, jnp.float32, seed=4)
    act = activation("silu")

    @functools.partial(jax.jit, static_argnums=0)
    def both(scheme, x, weights, experts, gate_up, down):
        q = [quant.quantize(w, quant.WeightQuant(scheme), 1, 1) for w in (gate_up, down)]
        return (sliced_experts(x, weights, experts, *q, act),
                routed_experts(x, weights, experts, *q, act, grouped=grouped_dot))

    for scheme in WEIGHT_ONLY:
        sliced, grouped = both(scheme, x, weights, experts, gate_up, down)
        np.testing.assert_allclose(np.asarray(sliced), np.asarray(grouped), atol=1e-5, rtol=1e-5, err_msg=scheme)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A family's tiny random checkpoint by name: (name, path, config), each written once per module."""
    checkpoints = {}

    def get(name):
        if name not in checkpoints:
            path = tmp_path_factory.mktemp(name)
            raw = FAMILIES[name]
            if name == "mixtral":  # every layer a MoE: one is enough (the others need a dense one before it)
                raw = dict(raw, num_hidden_layers=1)
            saved_random_hf_model(raw, path)
            checkpoints[name] = name, path, ModelConfig.from_model_dir(path)
        return checkpoints[name]

    return get


@pytest.fixture(params=["mixtral", "qwen2_moe", "deepseek_v2"])
def family(request, saved):
    return saved(request.param)


@functools.lru_cache(maxsize=None)
def _step(config):
    model = build_model(config, jnp.float32)
    return model, jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True)[0])


def logits_of(config, params):
    model, step = _step(config)
    return np.asarray(step(params, jnp.asarray(TOKENS, jnp.int32), prefill_meta(len(TOKENS), 32),
                           init_kv_cache(model, 32)))


_loaded: dict = {}


def load(path, config, scheme, tp=1):
    """(config, params) of the checkpoint at `path` quantised at load with `scheme` (once per module)."""
    key = (str(path), scheme, tp)
    if key not in _loaded:
        qconfig = dataclasses.replace(config, weight_quant=quant.WeightQuant(scheme))
        _loaded[key] = qconfig, load_hf(build_model(qconfig, jnp.float32), path, make_mesh(tp), tp)
    return _loaded[key]


dequantised = jax.jit(lambda params: jax.tree.map(lambda w: quant.dequantize(w) if quant.is_quantised(w) else w,
                                                  params, is_leaf=quant.is_quantised))


def moe_layer(params):
    return next(layer["mlp"] for name, layer in sorted(params.items())
                if name.startswith("layers_") and "experts_down_proj" in layer.get("mlp", {}))


EXPECTED_TYPES = {"w8a16": quant.Int8Weight, "w4a16": quant.Int4Weight, "w8a8": quant.Int8Weight,
                  "fp8_w8a8": quant.Fp8Weight}
# Every scheme on Mixtral; the families' own parts (Qwen2-MoE's gated shared expert, DeepSeek's latent attention,
# dense first layer and float32 router) under weight-only schemes, exact: the grouped products are the same code
# whatever the family, and each model compile costs seconds of CI.
CASES = {"mixtral": ("w4a16", "w8a8", "fp8_w8a8"), "qwen2_moe": ("w4a16",), "deepseek_v2": ("w8a16",)}


def test_quantised_experts_match_their_dequantised_weights(family):
    """Every matmul weight, experts and shared experts included, quantised at load; the router stays 16-/32-bit.
    Weight-only schemes: the dequantised model's logits (≤ 1e-4). w8a8 / fp8 also quantise activations per
    token: close, not equal (their grouped products are checked exactly above)."""
    name, path, config = family
    for scheme in CASES[name]:
        qconfig, params = load(path, config, scheme)
        mlp = moe_layer(params)
        for weight in (mlp["experts_gate_up_proj"], mlp["experts_down_proj"]):
            assert isinstance(weight, EXPECTED_TYPES[scheme]) and weight.lead_axes == 1
        assert not quant.is_quantised(mlp["router"])
        if "shared_expert" in mlp:
            assert isinstance(mlp["shared_expert"]["down_proj"], EXPECTED_TYPES[scheme])
        logits = logits_of(qconfig, params)
        expected = logits_of(config, dequantised(params))
        if scheme in WEIGHT_ONLY:
            np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0, err_msg=scheme)
        else:
            # e4m3 keeps 3 mantissa bits: its per-token activations lose more than int8's
            bound = {"w8a8": 0.1, "fp8_w8a8": 0.2}[scheme]
            assert np.abs(logits - expected).max() < bound * np.abs(expected).max(), scheme
            assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.8, scheme


def test_tp2_matches_tp1(saved):
    """Experts split on their intermediate axis over 2 fake CPU devices, scales with their weights (Mixtral)."""
    _, path, config = saved("mixtral")
    qconfig, params1 = load(path, config, "w8a8")
    _, params2 = load(path, config, "w8a8", tp=2)
    down = params2["layers_0"]["mlp"]["experts_down_proj"]  # data [E, D, F]: F (its input) split
    assert tuple(down.data.sharding.spec) == (None, None, "tp") and tuple(down.scale.sharding.spec) == (None, None)
    gate_up = params2["layers_0"]["mlp"]["experts_gate_up_proj"]  # data [E, F, 2, D], scale [E, F, 2]
    assert tuple(gate_up.scale.sharding.spec) == (None, "tp", None)
    np.testing.assert_allclose(logits_of(qconfig, params2), logits_of(qconfig, params1), atol=1e-4, rtol=0)


def test_converted_quantised_directory_loads_the_same_weights(saved, tmp_path):
    """`tools.convert --quant w4a16` writes an orbax directory that loads without re-quantising: the weights
    and logits of quantising at load (Qwen2-MoE, shared experts included)."""
    from tools.convert.__main__ import main

    _, path, config = saved("qwen2_moe")
    assert main(["--src", str(path), "--dst", str(tmp_path / "out"), "--quant", "w4a16"]) == 0
    converted = ModelConfig.from_model_dir(tmp_path / "out")
    assert converted.weight_quant == quant.WeightQuant("w4a16")
    restored = load_params(build_model(converted, jnp.float32), tmp_path / "out", make_mesh(1), 1)
    qconfig, at_load = load(path, config, "w4a16")
    assert isinstance(moe_layer(restored)["experts_gate_up_proj"], quant.Int4Weight)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(at_load)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert converted == qconfig  # the same model: the same weights give the same logits
    np.testing.assert_array_equal(logits_of(converted, restored), logits_of(qconfig, at_load))
