"""Checkpoints quantised by other tools: small AWQ, GPTQ (v1 and v2 zero points) and FP8 checkpoints built here
(random codes, zero points and scales), loaded without re-quantising, against a 16-bit checkpoint of the same
weights dequantised."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jaxllm import prequant
from jaxllm.config import ModelConfig
from jaxllm.models import build_model, init_kv_cache, quant
from jaxllm.parallel import make_mesh
from jaxllm.weights import load_hf
from tests.models.hf_oracle import prefill_meta
from tests.models.test_llama import save_random_hf_model

# o_proj's input (4 heads × 32) is one AWQ/GPTQ group of 128: our groups along head_dim (32) hold it exactly.
RAW = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
           rope_theta=10000.0)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 128
TOKENS = np.random.default_rng(9).integers(0, 256, size=19)


def _pack(codes: np.ndarray, axis: int, order=tuple(range(8))) -> np.ndarray:
    """uint codes → int32 words of 8 along `axis`; value at position order[i] goes to nibble i."""
    moved = np.moveaxis(codes.astype(np.uint32), axis, -1)
    eights = moved.reshape(*moved.shape[:-1], -1, 8)[..., list(order)]
    words = np.bitwise_or.reduce(eights << (np.arange(8, dtype=np.uint32) * 4), axis=-1)
    return np.moveaxis(words.view(np.int32), -1, axis)


def _int4_linear(rng, out_features, in_features, fmt):
    """Random codes/zeros/scales of one linear in `fmt`'s tensors, and the weight they stand for [out, in]."""
    codes = rng.integers(0, 16, (in_features, out_features))
    # GPTQ v1 stores zero points minus one in 4 bits, so it cannot hold a zero point of 0
    zeros = rng.integers(1 if fmt == "gptq" else 0, 16, (in_features // GROUP, out_features))
    scales = (rng.random((in_features // GROUP, out_features)) * 0.02 + 0.01).astype(np.float16)
    weight = (codes - np.repeat(zeros, GROUP, 0)) * np.repeat(scales.astype(np.float32), GROUP, 0)
    if fmt == "awq":
        tensors = {"qweight": _pack(codes, 1, prequant.AWQ_ORDER), "qzeros": _pack(zeros, 1, prequant.AWQ_ORDER)}
    else:
        stored = zeros - 1 if fmt == "gptq" else zeros
        tensors = {"qweight": _pack(codes, 0), "qzeros": _pack(stored, 1),
                   "g_idx": (np.arange(in_features) // GROUP).astype(np.int32)}
    tensors["scales"] = scales
    return tensors, weight.T


def _fp8_linear(rng, out_features, in_features, per_channel):
    data = torch.from_numpy(rng.standard_normal((out_features, in_features)).astype(np.float32) * 50).to(
        torch.float8_e4m3fn)
    scale = rng.random((out_features, 1) if per_channel else ()).astype(np.float32) * 0.002 + 0.001
    weight = data.float().numpy() * scale
    return {"weight": data, "weight_scale": torch.from_numpy(np.asarray(scale))}, weight


def build(path, fmt, rng):
    """A quantised checkpoint in `path / fmt` and the 16-bit one of its dequantised weights in `path / "ref"`."""
    hf = save_random_hf_model(RAW, path / "ref")
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    quantised = dict(state)
    for layer in range(RAW["num_hidden_layers"]):
        for j, linear in enumerate(LINEARS):
            kind = "mlp" if "_proj" in linear and linear in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"model.layers.{layer}.{kind}.{linear}"
            out_features, in_features = state[prefix + ".weight"].shape
            if fmt == "fp8":
                tensors, weight = _fp8_linear(rng, out_features, in_features, per_channel=j % 2 == 1)
            else:
                tensors, weight = _int4_linear(rng, out_features, in_features, fmt)
            del quantised[prefix + ".weight"]
            for suffix, value in tensors.items():
                quantised[f"{prefix}.{suffix}"] = value if torch.is_tensor(value) else torch.from_numpy(value)
            state[prefix + ".weight"] = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
    save_file({k: v.contiguous() for k, v in state.items()}, path / "ref" / "model.safetensors")
    (path / fmt).mkdir()
    save_file({k: v.contiguous() for k, v in quantised.items()}, path / fmt / "model.safetensors")
    config = json.loads((path / "ref" / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "activation_scheme": "dynamic"} if fmt == "fp8" else
        {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
        if fmt == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
         **({"checkpoint_format": "gptq_v2"} if fmt == "gptq_v2" else {})})
    (path / fmt / "config.json").write_text(json.dumps(config))
    return path / fmt, path / "ref"


def logits(model_dir):
    config = ModelConfig.from_model_dir(model_dir)
    model = build_model(config, jnp.float32)
    params = load_hf(model, model_dir, make_mesh(1), 1)
    meta = prefill_meta(len(TOKENS), 32)
    with jax.default_matmul_precision("highest"):
        out, _ = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, m, c, all_logits=True))(
            params, jnp.asarray(TOKENS, jnp.int32), meta, init_kv_cache(model, 32))
    return config, params, np.asarray(out)


def test_gptq_v2_zero_points_are_stored_as_they_are():
    """v1 stores each zero point minus one; v2 (and AWQ, in its own nibble order) the zero point itself."""
    rng = np.random.default_rng(2)
    for fmt in ("gptq", "gptq_v2", "awq"):
        tensors, weight = _int4_linear(rng, 16, GROUP, fmt)
        group = {"." + k: v for k, v in tensors.items() if k != "g_idx"}
        fields = prequant._int4_fields(group, fmt)
        dequantised = (fields["codes"] - fields["zero"]) * fields["scale"]
        np.testing.assert_allclose(dequantised, weight, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_checkpoints_load_exactly(tmp_path, fmt):
    quantised, ref = build(tmp_path, fmt, np.random.default_rng(len(fmt)))
    config, params, got = logits(quantised)
    assert config.weight_quant == quant.WeightQuant("w4a16", GROUP, checkpoint_format=fmt)
    assert isinstance(params["layers_1"]["self_attn"]["o_proj"], quant.Int4Weight)
    _, _, expected = logits(ref)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_fp8_checkpoint_keeps_its_bytes(tmp_path):
    quantised, ref = build(tmp_path, "fp8", np.random.default_rng(1))
    config, params, got = logits(quantised)
    assert config.weight_quant.scheme == "fp8_w8a8"
    down = params["layers_0"]["mlp"]["down_proj"]
    assert isinstance(down, quant.Fp8Weight) and down.data.dtype == jnp.float8_e4m3fn
    ref_config, ref_params, expected = logits(ref)
    weight = np.asarray(ref_params["layers_0"]["mlp"]["down_proj"])  # [in, out], dequantised in the checkpoint
    np.testing.assert_allclose(np.asarray(quant.dequantize(down)), weight, rtol=1e-6)
    # activations are quantised to e4m3 per token: close to the dequantised-weight model, not equal
    assert np.linalg.norm(got - expected) < 0.1 * np.linalg.norm(expected)
