"""Quantised weights in the model: a tiny random HF Llama quantised at load (w8a16, w4a16, w8a8, fp8_w8a8)
against the same model with those weights dequantised back to float32; tp 2 on fake CPU devices against tp 1;
ppl_w8a8_mixdown's 16-bit down-projections; each product of `qdot.dot` against its reference."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache, qdot, quant
from jaxllm.models.backends import resolve_modes
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf
from kernels.pallas import quant_gemv, reference, row_quant, two_digit_matmul
from tests.models.hf_oracle import prefill_meta
from tests.models.test_llama import save_random_hf_model

# intermediate 256: int4 groups of 128 along the down-projection's input, split in two under tp 2;
# hidden 64 and head_dim 16: smaller groups where the input axis is shorter than 128.
RAW = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
           rope_theta=10000.0)
TOKENS = np.random.default_rng(5).integers(0, 256, size=23)


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """On a GPU, XLA's float32 dots default to TF32; the comparisons here want float32 (as on the CPU)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant_llama")
    save_random_hf_model(RAW, path)
    return path, ModelConfig.from_model_dir(path)


@functools.lru_cache(maxsize=None)
def _step(config):
    model = build_model(config, jnp.float32)
    return model, jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))


def logits_of(config, params):
    model, step = _step(config)
    meta = prefill_meta(len(TOKENS), 32)
    logits, _ = step(params, jnp.asarray(TOKENS, jnp.int32), meta, init_kv_cache(model, 32))
    return np.asarray(logits)


@pytest.fixture(scope="module")
def original_logits(checkpoint):
    path, config = checkpoint
    return logits_of(config, load(path, config)[1])


def load(path, config, scheme=None, tp=1, keep_16bit_down=frozenset()):
    if scheme is not None:
        config = dataclasses.replace(config, weight_quant=quant.WeightQuant(scheme, keep_16bit_down=keep_16bit_down))
    return config, load_hf(build_model(config, jnp.float32), path, make_mesh(tp), tp)


def dequantised(params):
    return jax.tree.map(lambda w: quant.dequantize(w) if quant.is_quantised(w) else w, params,
                        is_leaf=quant.is_quantised)


EXPECTED_TYPES = {"w8a16": quant.Int8Weight, "w4a16": quant.Int4Weight, "w8a8": quant.Int8Weight,
                  "fp8_w8a8": quant.Fp8Weight}


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_weight_only_logits_match_dequantised_weights(checkpoint, original_logits, scheme):
    path, config = checkpoint
    qconfig, params = load(path, config, scheme)
    layer = params["layers_1"]
    for weight in (layer["self_attn"]["qkv_proj"], layer["self_attn"]["o_proj"], layer["mlp"]["gate_up_proj"],
                   layer["mlp"]["down_proj"]):
        assert isinstance(weight, EXPECTED_TYPES[scheme])
    assert not quant.is_quantised(params["embed_tokens"]) and not quant.is_quantised(params["lm_head"])
    logits = logits_of(qconfig, params)
    expected = logits_of(config, dequantised(params))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    # and the quantisation itself loses little against the 16-bit weights
    original = original_logits
    assert np.abs(logits - original).max() < (0.05 if scheme == "w8a16" else 0.5) * np.abs(original).max()


@pytest.mark.parametrize("scheme", ["w8a8"])  # fp8: tests/models/test_prequant.py
def test_quantised_activation_logits_stay_close(checkpoint, scheme):
    """w8a8 / fp8 also quantise activations per token: close to the dequantised-weight model, not equal."""
    path, config = checkpoint
    qconfig, params = load(path, config, scheme)
    assert isinstance(params["layers_0"]["mlp"]["down_proj"], EXPECTED_TYPES[scheme])
    logits = logits_of(qconfig, params)
    expected = logits_of(config, dequantised(params))
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.8


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8"])
def test_tp2_matches_tp1(checkpoint, scheme):
    path, config = checkpoint
    qconfig, params1 = load(path, config, scheme, tp=1)
    _, params2 = load(path, config, scheme, tp=2)
    down = params2["layers_0"]["mlp"]["down_proj"]  # row-parallel: its input axis (and int4 groups) split
    if scheme == "w4a16":
        assert down.packed.sharding.spec[0] == "tp" and down.scale.sharding.spec[0] == "tp"
    else:  # int8 data is stored [out, in]
        assert tuple(down.data.sharding.spec) == (None, "tp")
    np.testing.assert_allclose(logits_of(qconfig, params2), logits_of(qconfig, params1), atol=1e-4, rtol=0)


def test_mixdown_keeps_listed_down_projections_16bit(checkpoint):
    path, config = checkpoint
    raw = dict(RAW, mixdown=[1])
    qconfig = quant.with_weight_mode(config, resolve_modes(["ppl_w8a8_mixdown"]).weight_mode, raw)
    assert qconfig.weight_quant == quant.WeightQuant("w8a8", keep_16bit_down=frozenset({1}))
    params = load_hf(build_model(qconfig, jnp.float32), path, make_mesh(1), 1)
    assert isinstance(params["layers_0"]["mlp"]["down_proj"], quant.Int8Weight)
    assert not quant.is_quantised(params["layers_1"]["mlp"]["down_proj"])
    assert isinstance(params["layers_1"]["mlp"]["gate_up_proj"], quant.Int8Weight)
    every = quant.with_weight_mode(config, "ppl_w8a8_mixdown", RAW)  # no list: every layer's stays 16-bit
    assert every.weight_quant.keep_16bit_down == frozenset({0, 1})


def test_mode_and_checkpoint_must_agree(checkpoint):
    _, config = checkpoint
    held = dataclasses.replace(config, weight_quant=quant.WeightQuant("w4a16"))
    assert quant.with_weight_mode(held, "ppl_w4a16", RAW) is held
    with pytest.raises(ValueError, match="asks for w8a16 weights, but the checkpoint holds w4a16"):
        quant.with_weight_mode(held, "triton_w8a16", RAW)


def test_dot_of_each_type_matches_its_reference():
    """x [n, heads, head_dim] @ o_proj-like [heads, head_dim, out]: two input axes flattened the same way."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 4, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 32, 48)) * 0.1, jnp.float32)
    einsum = jax.jit(lambda x, w: jnp.einsum("nhk,hkd->nd", x, w))
    plain = np.asarray(einsum(x, w))
    for quantize in (quant.quantize_int8, quant.quantize_int4):  # weight-only: exact up to float32 rounding
        q = quantize(w, 2)
        np.testing.assert_allclose(jax.jit(qdot.dot)(x, q), einsum(x, quant.dequantize(q)), atol=1e-5)
    q8 = quant.quantize_int8(w, 2, int8_activations=True)
    x_q, x_scale = reference.quantize_rows_int8(x.reshape(5, -1))
    expected = reference.int8_int8_matmul(x_q, x_scale, q8.data.reshape(48, 128), q8.scale, jnp.float32)
    np.testing.assert_allclose(jax.jit(qdot.dot)(x, q8), expected, atol=1e-6)
    f8 = quant.quantize_fp8(w, 2)  # e4m3 activations: three mantissa bits
    x_f8, x_f8_scale = reference.quantize_rows_fp8(x.reshape(5, -1))
    fake = (x_f8.astype(jnp.float32) * x_f8_scale[:, None]).reshape(x.shape)
    np.testing.assert_allclose(jax.jit(qdot.dot)(x, f8), einsum(fake, quant.dequantize(f8)), atol=1e-5)
    assert np.abs(np.asarray(jax.jit(qdot.dot)(x, f8)) - plain).max() < 0.1 * np.abs(plain).max()


@pytest.mark.parametrize("quantize", [functools.partial(quant.quantize_int8, int8_activations=True),
                                      quant.quantize_fp8], ids=["w8a8", "fp8"])
def test_per_token_schemes_fold_a_norm_into_the_row_scale(quantize, monkeypatch):
    """Rows whose RMS norm is not applied yet (`NormedRows`) reach a w8a8 / fp8 product as x ⊙ weight, each
    row's 1 / rms joining its quantisation scale: exactly the quantised product of the normalised rows (per-row
    quantisation does not see a row's scale), up to the rows' float32 rounding."""
    from jaxllm.models.normed import NormedRows

    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((6, 128)) * rng.choice([0.01, 1.0, 30.0], (6, 1)), jnp.float32)
    rows = NormedRows(x, jnp.asarray(rng.uniform(0.5, 1.5, 128), jnp.float32), 1e-5, jnp.float32)
    q = quantize(jnp.asarray(rng.standard_normal((128, 96)) * 0.1, jnp.float32))
    kinds = []
    quantized_rows = qdot._quantized_rows
    monkeypatch.setattr(qdot, "_quantized_rows", lambda x, w: kinds.append(type(x).__name__) or quantized_rows(x, w))
    folded, plain = np.asarray(qdot.dot(rows, q)), np.asarray(qdot.dot(rows.value(), q))
    assert kinds == ["NormedRows", "ArrayImpl"]  # the normalised rows' product takes the plain path
    np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
    exact = np.asarray(rows.value()) @ np.asarray(quant.dequantize(q))
    assert np.abs(folded - exact).max() < 0.1 * np.abs(exact).max()


def test_fp8_product_in_bf16_stays_within_its_rounding(monkeypatch):
    """qdot.FP8_PRODUCT_DTYPE bf16 (the default: the GEMM writes bf16 before the scales): the float32 product's
    values, rounded once more to bf16."""
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.standard_normal((7, 128)), jnp.bfloat16)
    q = quant.quantize_fp8(jnp.asarray(rng.standard_normal((128, 80)) * 0.1, jnp.float32))
    assert qdot.FP8_PRODUCT_DTYPE == jnp.bfloat16
    narrow = np.asarray(qdot.dot(x, q), np.float32)
    monkeypatch.setattr(qdot, "FP8_PRODUCT_DTYPE", jnp.float32)
    wide = np.asarray(qdot.dot(x, q), np.float32)
    assert not np.array_equal(wide, narrow)  # the bf16 product did run
    np.testing.assert_allclose(narrow, wide, rtol=2**-7, atol=2**-7 * np.abs(wide).max())


def test_one_row_w8a16_on_a_gpu_takes_the_two_digit_product(monkeypatch):
    """On one GPU a one-row w8a16 product runs XLA's int8 GEMM on x's digits (no Pallas kernel: it runs here
    too), through the same reshapes as the other paths: o_proj-like weights with two input axes."""
    monkeypatch.setattr(qdot, "kernels_enabled", lambda: True)
    monkeypatch.setattr(qdot, "W8_DIGITS_KERNEL_MAX_ROWS", 0)  # the digits by XLA's ops (the kernel: below)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 4, 32)), jnp.float32)
    q = quant.quantize_int8(jnp.asarray(rng.standard_normal((4, 32, 48)) * 0.1, jnp.float32), 2)
    dots = [e for e in jax.make_jaxpr(qdot.dot)(x, q).eqns if e.primitive.name == "dot_general"]
    assert [(e.invars[0].aval.shape, e.invars[0].aval.dtype, e.params["preferred_element_type"]) for e in dots] == [
        ((2, 128), jnp.int8, jnp.int32)]
    out = jax.jit(qdot.dot)(x, q)
    direct = two_digit_matmul.int8_matmul(x.reshape(1, 128), q.data.reshape(48, 128), q.scale.reshape(48))
    np.testing.assert_allclose(out, direct, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, jnp.einsum("nhk,hkd->nd", x, quant.dequantize(q)), rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(qdot, "kernels_enabled", lambda: False)  # the CPU's path: a float dot (a fresh trace)
    dots = [e for e in jax.make_jaxpr(lambda x, q: qdot.dot(x, q))(x, q).eqns if e.primitive.name == "dot_general"]
    assert [(e.invars[0].aval.shape, e.invars[0].aval.dtype) for e in dots] == [((1, 128), jnp.float32)]


@pytest.fixture(scope="module")
def w8a16_one_row_logits(checkpoint):
    """(config, params, logits) of a one-token step of the w8a16 model on the CPU's path."""
    path, config = checkpoint
    qconfig, params = load(path, config, "w8a16")
    model, step = _step(qconfig)
    logits, _ = step(params, jnp.asarray(TOKENS[:1], jnp.int32), prefill_meta(1, 32), init_kv_cache(model, 32))
    return qconfig, params, logits


@pytest.mark.parametrize("digits_kernel", [False, True])
def test_one_row_w8a16_model_folds_its_norms_into_the_digits(w8a16_one_row_logits, monkeypatch, request,
                                                             digits_kernel):
    """A one-row step of a w8a16 Llama on the GPU's path: the norms before the q/k/v and gate/up products reach
    them unapplied and are folded into the digits (two products a layer), o and down take plain rows; the logits
    stay those of the CPU's path (a float dot on the normalised rows) to within the digits' rounding. With
    `digits_kernel` the digits come from the Pallas kernel (interpret mode here)."""
    qconfig, params, expected = w8a16_one_row_logits
    model = build_model(qconfig, jnp.float32)
    tokens, meta = jnp.asarray(TOKENS[:1], jnp.int32), prefill_meta(1, 32)
    monkeypatch.setattr(qdot, "kernels_enabled", lambda: True)
    monkeypatch.setattr(qdot, "W8_DIGITS_KERNEL_MAX_ROWS", 1 if digits_kernel else 0)
    monkeypatch.setattr(two_digit_matmul, "int16_digits_kernel",
                        functools.partial(two_digit_matmul.int16_digits_kernel, interpret=True))
    calls = []
    product = two_digit_matmul.int8_matmul

    def recorded(x, w, scale, norm_weight=None, eps=0.0, digits_kernel=False):
        calls.append((norm_weight is not None, digits_kernel))
        return product(x, w, scale, norm_weight, eps, digits_kernel)

    monkeypatch.setattr(two_digit_matmul, "int8_matmul", recorded)
    jax.clear_caches()  # fresh traces under the patches (the layers' nested jit keeps its own), dropped after
    request.addfinalizer(jax.clear_caches)
    _, step = _step(qconfig)
    logits, _ = step(params, tokens, meta, init_kv_cache(model, 32))
    kinds = sorted(set(calls))
    assert kinds == [(False, digits_kernel), (True, digits_kernel)]
    assert sum(normed for normed, _ in calls) == sum(not normed for normed, _ in calls) == 2  # per layer kind
    expected, logits = np.asarray(expected), np.asarray(logits)
    assert np.abs(logits - expected).max() < 1e-3 * np.abs(expected).max()
    assert logits.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_engine_serves_a_weight_mode(checkpoint):
    """The offline engine with `--mode triton_w4a16` (quantised at load, real scheduler and runner): its greedy
    tokens are the argmax of the quantised model's own logits, recomputed over the whole sequence."""
    from jaxllm import LLM, SamplingParams

    path, config = checkpoint
    qconfig, params = load(path, config, "w4a16")
    prompts = [[int(t) for t in TOKENS[:9]], [int(t) for t in TOKENS[5:12]]]
    flags = dict(mode=["triton_w4a16"], data_type="float32", max_total_token_num=512, max_req_input_len=64,
                 max_req_total_len=96, batch_max_tokens=256, warmup=0, disable_log_stats=True, eos_id=[-1])
    with LLM(str(path), **flags) as llm:
        assert llm.engine.config.weight_quant == quant.WeightQuant("w4a16")
        outputs = llm.generate(prompts, SamplingParams(max_new_tokens=6))
    model, step = _step(qconfig)
    for prompt, out in zip(prompts, outputs):
        ids = list(prompt)
        for _ in range(6):
            meta = prefill_meta(len(ids), 32)
            logits, _ = step(params, jnp.asarray(ids, jnp.int32), meta, init_kv_cache(model, 32))
            ids.append(int(np.asarray(logits)[-1].argmax()))
        assert out.token_ids == ids[len(prompt):]


@pytest.mark.parametrize("scheme,kernel", [("w8a16", "int8_gemv"), ("w4a16", "int4_gemv")])
def test_one_row_bf16_model_takes_the_gemv_with_its_norms_folded(checkpoint, monkeypatch, request, scheme, kernel):
    """A one-row step of a bf16 Llama on the GPU's path runs every quantised product in the matrix-vector kernel
    (interpret mode here; the switches on: W8_GEMV_MAX_ROWS = 1, W4_GEMV_FOLDS_NORM), the q/k/v and gate/up ones
    with their norms folded in; its logits stay those of the CPU's path (float dots of the bf16 rows) to within
    bf16's rounding."""
    path, config = checkpoint
    qconfig = dataclasses.replace(config, weight_quant=quant.WeightQuant(scheme))
    model = build_model(qconfig, jnp.bfloat16)
    params = load_hf(model, path, make_mesh(1), 1)
    tokens, meta = jnp.asarray(TOKENS[:1], jnp.int32), prefill_meta(1, 32)

    def run():
        step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))
        return np.asarray(step(params, tokens, meta, init_kv_cache(model, 32))[0], np.float32)

    expected = run()
    monkeypatch.setattr(qdot, "kernels_enabled", lambda: True)
    monkeypatch.setattr(qdot, "W8_GEMV_MAX_ROWS", 1)
    monkeypatch.setattr(qdot, "W4_GEMV_FOLDS_NORM", True)
    calls = []  # whether each call folded a norm (its weight and epsilon follow the weight's arrays)
    gemv, weight_arrays = getattr(quant_gemv, kernel), {"int8_gemv": 2, "int4_gemv": 3}[kernel]

    def recorded(*args, **kwargs):
        calls.append(len(args) > 1 + weight_arrays)
        return gemv(*args, **kwargs, interpret=True)

    monkeypatch.setattr(quant_gemv, kernel, recorded)
    jax.clear_caches()  # fresh traces under the patches, dropped after
    request.addfinalizer(jax.clear_caches)
    logits = run()
    assert sorted(set(calls)) == [False, True] and len(calls) >= 4  # q/k/v, o, gate/up, down
    assert np.linalg.norm(logits - expected) < 2e-2 * np.linalg.norm(expected)


@pytest.mark.parametrize("scheme", ["w8a8", "fp8_w8a8"])
def test_per_token_model_on_a_gpu_quantises_its_rows_in_one_kernel(checkpoint, monkeypatch, request, scheme):
    """A bf16 w8a8 / fp8 Llama step on the GPU's path (the switch on: ROW_QUANT_KERNEL) quantises every product's
    rows with the row kernel (interpret mode here): the norms before q/k/v and gate/up folded in, the MLP's
    silu(gate) · up formed in it, attention's output as it is; the logits stay those of the CPU's path (XLA's
    quantisation of the same rows) to within the activations' own rounding (the kernel rounds silu(gate) · up to
    bf16 once, XLA after each op)."""
    path, config = checkpoint
    qconfig = dataclasses.replace(config, weight_quant=quant.WeightQuant(scheme))
    model = build_model(qconfig, jnp.bfloat16)
    params = load_hf(model, path, make_mesh(1), 1)
    tokens, meta = jnp.asarray(TOKENS, jnp.int32), prefill_meta(len(TOKENS), 32)

    def run():
        step = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))
        return np.asarray(step(params, tokens, meta, init_kv_cache(model, 32))[0], np.float32)

    expected = run()
    monkeypatch.setattr(qdot, "kernels_enabled", lambda: True)
    monkeypatch.setattr(qdot, "ROW_QUANT_KERNEL", True)
    forms = []
    kernel = row_quant.quantize_rows

    def recorded(x, dtype, norm_weight=None, eps=0.0, gated=False):
        forms.append("gated" if gated else "normed" if norm_weight is not None else "plain")
        return kernel(x, dtype, norm_weight, eps, gated=gated, interpret=True)

    monkeypatch.setattr(row_quant, "quantize_rows", recorded)
    jax.clear_caches()  # fresh traces under the patches, dropped after
    request.addfinalizer(jax.clear_caches)
    logits = run()
    # per layer traced: q/k/v and gate/up normed, o plain, down gated
    assert sorted(set(forms)) == ["gated", "normed", "plain"]
    assert forms.count("normed") == 2 * forms.count("gated") == 2 * forms.count("plain")
    # e4m3 keeps 3 mantissa bits: a bf16 rounding of silu(gate) · up that differs moves a value a whole e4m3 step
    tolerance = {"w8a8": 2e-2, "fp8_w8a8": 5e-2}[scheme]
    assert np.linalg.norm(logits - expected) < tolerance * np.linalg.norm(expected)
    # a random model's near-ties (top two within a few thousandths) fall either way with the CPU's rounding:
    # the tokens the reference picks clearly stay picked
    top2 = np.sort(expected, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05
    assert clear.sum() >= 5 and np.array_equal(logits.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_gated_rows_reach_a_per_token_product_as_their_value():
    """GatedRows on the XLA path (the CPU, --tp): the product of act(gate) · up, exactly as if formed first."""
    from jaxllm.models.normed import GatedRows

    rng = np.random.default_rng(13)
    h = jnp.asarray(rng.standard_normal((5, 2, 128)) * 3, jnp.bfloat16)
    rows = GatedRows(h, jax.nn.silu)
    assert rows.shape == (5, 128) and rows.dtype == jnp.bfloat16
    for q in (quant.quantize_int8(jnp.asarray(rng.standard_normal((128, 48)) * 0.1, jnp.float32),
                                  int8_activations=True),
              quant.quantize_fp8(jnp.asarray(rng.standard_normal((128, 48)) * 0.1, jnp.float32))):
        np.testing.assert_array_equal(np.asarray(qdot.dot(rows, q), np.float32),
                                      np.asarray(qdot.dot(rows.value(), q), np.float32))
