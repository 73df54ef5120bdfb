"""Calibrated quantisation in tools.convert (`--quant w4a16|w8a8 --calibration`): AWQ's and GPTQ's int4
weights give a smaller output error than round to nearest on a random layer's calibration inputs; on a tiny
random Llama, each recipe's model (and SmoothQuant's w8a8) gives logits closer to the 16-bit model's than
round to nearest, and the written checkpoint loads unchanged, as the model of its own dequantised weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_checkpoints import PROMPT, VOCAB, VOCAB_MERGES, save_tiny_llama

from tools.convert import convert
from tools.convert.__main__ import main

WINDOWS, WINDOW_LEN = 4, 48


def _save_tokenizer(dst):
    """The tiny checkpoints' byte-level BPE vocabulary as a fast tokenizer in `dst`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = models.BPE(vocab={t: i for i, t in enumerate(VOCAB)}, merges=[tuple(m.split()) for m in VOCAB_MERGES])
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=VOCAB[0]).save_pretrained(dst)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF dir with a tokenizer, 16-bit model, its float32 params with outlier norm channels, random windows)."""
    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_hf

    src = tmp_path_factory.mktemp("calibrated")
    save_tiny_llama(src, tie=True, seed=3)
    _save_tokenizer(src)
    model16 = build_model(ModelConfig.from_model_dir(src), jnp.float32)
    params = load_hf(model16, src, make_mesh(1), 1)
    rng = np.random.default_rng(7)
    for layer in ("layers_0", "layers_1"):  # a few large channels into each norm, as trained models have
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weight = np.array(params[layer][norm]["weight"])
            weight[rng.choice(weight.size, 3, replace=False)] *= 25.0
            params[layer][norm]["weight"] = jnp.asarray(weight)
    windows = [list(rng.integers(3, model16.config.vocab_size, WINDOW_LEN)) for _ in range(WINDOWS)]
    return src, model16, params, windows


@pytest.fixture(scope="module")
def calibration(tiny):
    """Every quantised weight's input statistics on the windows (Gram matrices, absmax, all rows), and the
    16-bit model's logits there."""
    from tools.convert.calibrated import quantised_paths
    from tools.convert.calibration import collect

    _, model16, params, windows = tiny
    paths = quantised_paths(_quantised(model16, "w8a16"))
    stats = collect(model16, params, windows, paths, gram=True, sample_rows=WINDOWS * WINDOW_LEN)
    return stats, _logits(model16, params, windows)


def _quantised(model16, scheme):
    from jaxllm.models import build_model, quant

    return build_model(dataclasses.replace(model16.config, weight_quant=quant.WeightQuant(scheme)), jnp.float32)


_STEPS: dict = {}


def _logits(model, params, windows):
    from jaxllm.models import one_sequence

    if id(model) not in _STEPS:  # one compilation per model (the calibrated and RTN params share one)
        _STEPS[id(model)] = (model, jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True)[0]))
    step = _STEPS[id(model)][1]
    return np.concatenate([np.asarray(step(params, jnp.asarray(ids, jnp.int32), *one_sequence(model, len(ids))))
                           for ids in windows])


def _rtn(model, params16):
    """Round to nearest (quantisation at load) of the same 16-bit params."""
    from flax import linen as nn

    from jaxllm.models import quant
    from jaxllm.weights import abstract_params

    abstract = nn.unbox(abstract_params(model))
    return jax.jit(lambda params: jax.tree.map(lambda w, like: quant.quantize_like(w, like)
                                               if quant.is_quantised(like) else w,
                                               params, abstract, is_leaf=quant.is_quantised))(params16)


def _logit_errors(model, calibrated, params16, windows, reference):
    """Mean |logit - 16-bit logit| on the windows of the `calibrated` params and of round to nearest."""
    logits = _logits(model, calibrated, windows), _logits(model, _rtn(model, params16), windows)
    return tuple(float(np.abs(lg - reference).mean()) for lg in logits)


def _layer(seed, rows=384, k=128, n=96, outliers=4):
    """Fresh random inputs x [rows, k] with a few large channels (as trained models' activations have) and a
    weight w [k, n]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, rng.choice(k, outliers, replace=False)] *= 20.0
    return x, (rng.standard_normal((k, n)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("recipe", ["awq", "gptq"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int4_recipe_beats_round_to_nearest_on_a_layer(recipe, seed):
    """One product on fresh random inputs: the recipe's int4 weight gives a smaller output error on its
    calibration inputs than round to nearest (AWQ: the scaled weight against the inputs divided by its scale;
    GPTQ: a least-squares improvement, so anything else is a bug)."""
    from tools.convert.awq import activation_scale, clipped_int4
    from tools.convert.gptq import gptq_int4
    from tools.convert.int4 import dequantize, quantize_groups

    group = 32
    x, w = _layer(seed)
    exact = x @ w
    err = lambda xs, wq: float(np.linalg.norm(exact - xs @ dequantize(*wq)))  # noqa: E731
    rtn = err(x, quantize_groups(w, group))
    if recipe == "awq":
        picked = activation_scale(x, w, group)
        s = np.ones(w.shape[0], np.float32) if picked is None else picked[0]
        got = err(x / s, clipped_int4(w * s[:, None], x / s, group))
    else:
        got = err(x, gptq_int4(w, x.astype(np.float64).T @ x, group))
    assert got < rtn, (got, rtn)


@pytest.mark.parametrize("seed", [0, 1])
def test_awq_scale_fit_lowers_each_groups_output_error(seed):
    """The least-squares scale fit after AWQ's clipping search lowers the output error of the calibration
    inputs in total and raises no (group, output)'s, keeping the zero points (integers) and the int4 levels."""
    from tools.convert.awq import clipped_int4
    from tools.convert.int4 import dequantize

    group = 32
    x, w = _layer(seed)
    clipped, fitted = clipped_int4(w, x, group, fit_rounds=0), clipped_int4(w, x, group)

    def group_errors(wq):
        diff = (w - dequantize(*wq)).reshape(-1, group, w.shape[1])  # [groups, g, N]
        xg = x.reshape(x.shape[0], -1, group).transpose(1, 0, 2)  # [groups, R, g]
        return np.sum((xg @ diff) ** 2, axis=1)  # [groups, N]

    before, after = group_errors(clipped), group_errors(fitted)
    np.testing.assert_array_equal(fitted[2], clipped[2])
    assert fitted[0].min() >= 0 and fitted[0].max() <= 15
    assert np.all(after <= before * (1 + 1e-5)), float((after / before).max())
    assert after.sum() < 0.99 * before.sum(), (after.sum(), before.sum())


@pytest.mark.parametrize("scheme, recipe", [("w4a16", "awq"), ("w4a16", "gptq"), ("w8a8", None)])
def test_calibration_beats_round_to_nearest(tiny, calibration, scheme, recipe):
    """The whole tiny model calibrated on the windows gives logits there closer to the 16-bit model's than
    round to nearest's (scaling moves error between a norm and its products, so the model is what counts)."""
    from tools.convert.calibrated import quantise

    _, model16, params16, windows = tiny
    stats, reference = calibration
    model = _quantised(model16, scheme)
    calibrated = quantise(params16, model, stats, log=lambda _: None, how=recipe)
    calibrated_err, rtn_err = _logit_errors(model, calibrated, params16, windows, reference)
    assert calibrated_err < rtn_err


def test_awq_on_sink_weighted_rows_beats_round_to_nearest(tiny, calibration):
    """AWQ as the converter calibrates it (each window's first row, the attention sink, FIRST_ROW_WEIGHT times
    in every product's sample) gives logits on its calibration windows closer to the 16-bit model's than round
    to nearest."""
    from tools.convert.calibrated import quantise, quantised_paths
    from tools.convert.calibration import FIRST_ROW_WEIGHT, collect

    _, model16, params16, windows = tiny
    _, reference = calibration
    model = _quantised(model16, "w4a16")
    stats = collect(model16, params16, windows, quantised_paths(model), gram=False, sample_rows=64, keep_first=True)
    sample = stats[("layers_0", "self_attn", "qkv_proj")].sample
    sink = sample[0]  # the first window's first row, FIRST_ROW_WEIGHT times at the head of its window's rows
    np.testing.assert_array_equal(sample[:FIRST_ROW_WEIGHT], np.broadcast_to(sink, (FIRST_ROW_WEIGHT, sink.size)))
    calibrated = quantise(params16, model, stats, log=lambda _: None, how="awq")
    calibrated_err, rtn_err = _logit_errors(model, calibrated, params16, windows, reference)
    assert calibrated_err < rtn_err, (calibrated_err, rtn_err)


def test_calibrated_checkpoint_loads_as_its_dequantised_weights(tiny, tmp_path):
    """`--quant w4a16 --calibration FILE` writes a checkpoint that loads as Int4Weight params unchanged, and
    its logits are those of the 16-bit model holding its dequantised weights."""
    from flax import linen as nn

    from jaxllm.config import ModelConfig
    from jaxllm.models import build_model, quant
    from jaxllm.parallel import make_mesh
    from jaxllm.weights import load_params

    src = tiny[0]
    text = tmp_path / "calibration.txt"
    text.write_text("hello hell he llo " * 64 + "the quick brown fox jumps over the lazy dog\n" * 16)
    dst = tmp_path / "w4"
    assert main(["--src", str(src), "--dst", str(dst), "--quant", "w4a16", "--calibration", str(text)]) == 0
    config = ModelConfig.from_model_dir(dst)
    assert config.weight_quant.scheme == "w4a16"
    model = build_model(config, jnp.float32)
    params = load_params(model, dst, make_mesh(1), 1)
    assert isinstance(params["layers_1"]["mlp"]["down_proj"], quant.Int4Weight)
    dequantised = jax.tree.map(lambda w: quant.dequantize(w) if quant.is_quantised(w) else w, params,
                               is_leaf=quant.is_quantised)
    model16 = build_model(dataclasses.replace(config, weight_quant=None), jnp.float32)
    assert jax.tree.structure(dequantised) == jax.tree.structure(nn.unbox(_abstract(model16)))
    with jax.default_matmul_precision("highest"):
        got, want = _logits(model, params, [PROMPT]), _logits(model16, dequantised, [PROMPT])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_calibration_refused_for_other_schemes(tiny, tmp_path):
    from tools.convert import ConvertError

    with pytest.raises(ConvertError, match="--calibration is built for --quant w4a16 or w8a8"):
        convert(tiny[0], tmp_path / "out", quant="w8a16", calibration="pydoc")


def _abstract(model):
    from jaxllm.weights import abstract_params

    return abstract_params(model)
